"""Summaries of finished runs: the first, best and last evaluation of each run directory, as one markdown table,
with each run's protocol card (protocol_card.py), beside published rows when asked.

python -m dino_recog.report output/demo/dino output/demo/recog output/demo/recog_scratch
python -m dino_recog.report RUN_DIR ... --extra output/demo/histogram.json eval.json
python -m dino_recog.report RUN_DIR --published docs/recipes.md [--recipe NAME ...]

Published rows are read from a markdown table (in docs/recipes.md) whose header names the columns, in any order:
`recipe`, `data`, `mAP`, `rank1` (in %) are required; any of the card's keys (`version`, `val`, `test_feature`,
`flip`, `mean`, `std`, `metric`, `rerank`, `aqe`, `ap`, `query`, `same_camera`, with the card's values: e.g. `V1`,
`train+val`, `before_neck`, `off`, `0.5,0.5,0.5`, `50/15/0.3`) state that row's conventions; other columns (`source`)
are ignored, and an empty cell or `?` is not compared. The first table whose header starts with `| recipe | data |` is
read. Each run is set beside the published rows of its test set (or those `--recipe` names), and every convention that
differs is a warning line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .protocol_card import CARD_KEYS, card_differences, card_line
from .runlog import read_jsonl
from .user_errors import user_errors

__all__ = ["compare_with_published", "main", "read_published", "run_summary", "table"]

COLUMNS = ("knn_top1", "rank1", "rank5", "mAP", "mINP")


def run_summary(run_dir: str | Path) -> list[dict]:
    """The first (before training), the best (highest mAP, where it is neither) and the last evaluation record of a
    run, labelled."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if not (run_dir / "log.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir}: no log.jsonl; expected the output directory of a training run")
    evals = read_jsonl(run_dir / "log.jsonl", "eval")
    if not evals:
        raise ValueError(f"{run_dir}: log.jsonl has no evaluation record; was evaluation switched on?")
    first, last = evals[0], evals[-1]
    rows = []
    if first["epoch"] == 0:
        rows.append({"run": f"{run_dir} (epoch 0, before training)", **first})
    best = max(evals, key=lambda r: r.get("mAP", -1.0))
    if best is not first and best is not last and "mAP" in best:
        rows.append({"run": f"{run_dir} (epoch {best['epoch']}, best mAP)", **best})
    if last is not first:
        rows.append({"run": f"{run_dir} (epoch {last['epoch']})", **last})
    card = _results_card(run_dir / "results.json")
    return [{**r, "protocol": card, "source": str(run_dir)} for r in rows]


def _results_card(path: Path) -> dict | None:
    """The protocol card of a run's results.json (None: no file, or one written before the card)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("protocol")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON file ({e.msg}, line {e.lineno})") from None


_REQUIRED = ("recipe", "data", "mAP", "rank1")


def read_published(path: str | Path) -> list[dict]:
    """The published rows of the first markdown table in `path` whose header starts with `| recipe | data |` (see
    the module docstring): {"recipe", "mAP", "rank1" (fractions), "protocol": {card key: value}}.

    Raises:
        ValueError: no such table, a required column missing, or a metric that is not a number (file and line named).
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if _cells(line)[:2] == ["recipe", "data"]), None)
    if start is None:
        raise ValueError(f"{path}: no published table (a markdown table whose header starts with | recipe | data |)")
    header = _cells(lines[start])
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        raise ValueError(f"{path}:{start + 1}: the published table lacks the column(s) {', '.join(missing)}")
    rows = []
    for n, line in enumerate(lines[start + 2 :], start + 3):  # after the |---| line
        if not line.lstrip().startswith("|"):
            break
        cells = dict(zip(header, _cells(line)))
        try:
            metrics = {k: float(cells[k]) / 100 for k in ("mAP", "rank1")}
        except (KeyError, ValueError):
            raise ValueError(f"{path}:{n}: mAP {cells.get('mAP')!r}, rank1 {cells.get('rank1')!r}; expected numbers "
                             "in %") from None  # fmt: skip
        card = {k: cells[k] for k in CARD_KEYS if cells.get(k, "") not in ("", "?")}
        rows.append({"recipe": cells["recipe"], **metrics, "protocol": card})
    return rows


def _cells(line: str) -> list[str]:
    line = line.strip()
    if not line.startswith("|"):
        return []
    return [c.strip().strip("`") for c in line.strip("|").split("|")]


def compare_with_published(rows: list[dict], published: list[dict], recipes: list[str]) -> tuple[list[dict], list[str]]:
    """The published rows to show beside `rows` (those named in `recipes`, else those of the runs' test sets) and one
    line per (run, published row): the conventions that differ, as warnings, or that they agree."""
    unknown = [r for r in recipes if r not in {p["recipe"] for p in published}]
    if unknown:
        names = ", ".join(p["recipe"] for p in published)
        raise ValueError(f"--recipe {', '.join(unknown)}: not in the published table (it has {names})")
    runs = {r["source"]: r.get("protocol") for r in rows if "source" in r}
    datasets = {c["data"] for c in runs.values() if c}
    chosen = [p for p in published if (p["recipe"] in recipes if recipes else p["protocol"].get("data") in datasets)]
    notes = []
    for source, card in runs.items():
        if not card:
            notes.append(f"warning: {source}: no protocol card (a results.json from before it, or none); its "
                         "conventions are unknown")  # fmt: skip
            continue
        for p in chosen:
            if p["protocol"].get("data") not in (None, card["data"]):
                continue
            diff = card_differences(card, p["protocol"])
            if diff:
                notes.append(f"warning: {source} vs published {p['recipe']}: " + "; ".join(diff))
            else:
                notes.append(f"{source} vs published {p['recipe']}: the same stated conventions")
    return [{"run": f"published: {p['recipe']}", **p} for p in chosen], notes


def table(rows: list[dict]) -> str:
    """A markdown table of the metrics (in %) present in any row."""
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    lines = ["| run | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{100 * r[c]:.1f}" if r.get(c) is not None else "" for c in cols]
        lines.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description="Summarise runs: first, best and last evaluation of each run directory."
    )
    parser.add_argument("runs", nargs="+", help="run directories holding log.jsonl")
    parser.add_argument("--extra", nargs="*", default=[], help="JSON files with a 'method' and metrics to add as rows "
                        "(eval_reid.py --json files, with their protocol card)")  # fmt: skip
    parser.add_argument("--published", help="markdown file with the published table (docs/recipes.md)")
    parser.add_argument("--recipe", nargs="*", default=[], help="--published: only these rows (default: those of "
                        "the runs' test sets)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.recipe and not args.published:
        parser.error("--recipe chooses rows of --published; add --published FILE")
    rows, notes = [], []
    with user_errors():
        try:
            for path in args.extra:
                try:
                    extra = json.loads(Path(path).read_text())
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: not a JSON file ({e.msg}, line {e.lineno})") from None
                rows.append({"run": extra.get("method", path), **extra, **({"source": path} if "protocol" in extra
                                                                          else {})})  # fmt: skip
            for run in args.runs:
                rows += run_summary(run)
            if args.published:
                shown, notes = compare_with_published(rows, read_published(args.published), args.recipe)
                rows += shown
        except ValueError as e:  # a run without evaluations, a log or --extra file that is not JSON
            sys.exit(f"error: {e}")
    cards = {r["source"]: r["protocol"] for r in rows if r.get("source") and r.get("protocol")}
    text = "\n".join([table(rows), *(f"protocol of {s}: {card_line(c)}" for s, c in cards.items()), *notes])
    print(text)
    return text


if __name__ == "__main__":
    main()
