"""Training curves from the JSON-lines logs of one or several runs, on one figure for comparison."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from ..runlog import read_jsonl

__all__ = ["METRICS", "PANEL_INCHES", "DPI", "curves_figure", "ln_k", "run_series", "plot_curves"]

# (record kind, key, title): the loss is the per-epoch mean, the lr and the stage-1 collapse monitors as logged every
# `log_every` iterations (a collapse shows within an epoch, which an epoch mean would hide)
METRICS = (
    ("epoch", "loss", "loss (epoch mean)"),
    ("epoch", "dino", "DINO term (epoch mean)"),
    ("train", "lr", "learning rate"),
    ("eval", "knn_top1", "kNN top-1 (%)"),
    ("eval", "rank1", "rank-1 (%)"),
    ("eval", "mAP", "mAP (%)"),
    ("train", "entropy_ratio", "teacher entropy / ln K"),
    ("train", "kl", "KL(teacher || student)"),
    ("train", "teacher_batch_entropy", "teacher batch entropy"),
)
PANEL_INCHES = (4.0, 3.0)
DPI = 100
COLUMNS = 3


def _steps_per_epoch(records: list[dict]) -> float | None:
    """Iterations per epoch, from the epoch records (`step` = epochs done x iterations per epoch)."""
    for r in records:
        if r.get("kind") == "epoch" and r.get("epoch"):
            return r["step"] / r["epoch"]
    return None


def run_series(run_dir: str | os.PathLike) -> dict[str, tuple[list[float], list[float]]]:
    """{key: (epochs, values)} of the METRICS present in RUN_DIR/log.jsonl.

    Epoch and eval records are placed at their epoch; train records (lr) at step / iterations per epoch, so that a
    warm-up shows up within the first epochs. A resumed run may log an epoch twice: the later record wins.
    """
    records = read_jsonl(Path(run_dir) / "log.jsonl")
    per_epoch = _steps_per_epoch(records)
    series = {}
    for kind, key, _ in METRICS:
        points: dict[float, float] = {}
        for r in records:
            if r.get("kind") != kind or r.get(key) is None:
                continue
            if kind == "train":
                x = r["step"] / per_epoch if per_epoch else float(r.get("epoch", 0))
            else:
                x = float(r.get("epoch", 0))
            points[x] = float(r[key]) * (100.0 if kind == "eval" else 1.0)
        if points:
            xs = sorted(points)
            series[key] = (xs, [points[x] for x in xs])
    return series


def ln_k(run_dir: str | os.PathLike) -> float | None:
    """ln K of a stage-1 run (K = model.out_dim in its config.yaml), the loss of a flat teacher; None for other runs.

    Read from the train records when config.yaml is absent: `entropy_ratio` is the teacher entropy / ln K."""
    path = Path(run_dir) / "config.yaml"
    if path.is_file():
        import yaml

        cfg = yaml.safe_load(path.read_text()) or {}
        out_dim = (cfg.get("model") or {}).get("out_dim") if "dino" in cfg else None
        return math.log(out_dim) if out_dim else None
    for r in read_jsonl(Path(run_dir) / "log.jsonl"):
        if r.get("kind") == "train" and r.get("entropy_ratio") and r.get("teacher_entropy") is not None:
            return r["teacher_entropy"] / r["entropy_ratio"]
    return None


def _labels(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Run directory names, with the parent prepended where two names would otherwise be the same."""
    paths = [Path(os.path.abspath(d)) for d in run_dirs]
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def curves_figure(run_dirs: Sequence[str | os.PathLike], title: str = ""):
    """The figure `plot_curves` saves (a matplotlib Figure on an Agg canvas); see there.

    Raises:
        ValueError: no run has any of the metrics.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    all_series = [run_series(d) for d in run_dirs]
    panels = [(key, name) for _, key, name in METRICS if any(key in s for s in all_series)]
    if not panels:
        raise ValueError(f"no loss, lr or evaluation records in {', '.join(map(str, run_dirs))}")
    rows = math.ceil(len(panels) / COLUMNS)
    cols = math.ceil(len(panels) / rows)  # 4 panels as 2 x 2, not 3 + 1
    fig = Figure(figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(run_dirs))]
    ln_ks = [ln_k(d) for d in run_dirs]
    for ax, (key, name) in zip(axes, panels):
        for series, label, color, lnk in zip(all_series, _labels(run_dirs), colors, ln_ks):
            if key in series:
                xs, ys = series[key]
                ax.plot(xs, ys, label=label, color=color, marker="o" if len(xs) < 30 else None, markersize=3)
                # A DINO loss at ln K is the flat teacher's (uniform collapse): the line it must stay below. With
                # DINOv2 the loss adds iBOT and KoLeo, so the line goes with the DINO term instead.
                if lnk is not None and key == ("dino" if "dino" in series else "loss"):
                    ax.axhline(lnk, color=color, linestyle="--", linewidth=1, label=f"ln K ({label})")
                    if ax is not axes[0]:
                        ax.legend(fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def plot_curves(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, title: str = "") -> Path:
    """Draw loss, lr, kNN top-1, rank-1 and mAP over epochs, and for stage 1 ln K on the loss (the DINO term with v2)
    and the collapse monitors (teacher entropy / ln K, KL, batch entropy): the panels present in any run, one line
    per run.

    The figure is `PANEL_INCHES` per panel, at most 3 panels per row, at `DPI`, drawn without a display (Agg canvas).

    Raises:
        ValueError: no run has any of the metrics.
    """
    fig = curves_figure(run_dirs, title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return out
