"""Summaries of finished runs: the first, best and last evaluation of each run directory, as one markdown table.

python -m dino_recog.report output/demo/dino output/demo/recog output/demo/recog_scratch
python -m dino_recog.report RUN_DIR ... --extra output/demo/histogram.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .runlog import read_jsonl
from .user_errors import user_errors

__all__ = ["run_summary", "table", "main"]

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
    return rows


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
    parser.add_argument("--extra", nargs="*", default=[], help="JSON files with a 'method' and metrics to add as rows")
    args = parser.parse_args(argv)
    rows = []
    with user_errors():
        try:
            for path in args.extra:
                try:
                    extra = json.loads(Path(path).read_text())
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: not a JSON file ({e.msg}, line {e.lineno})") from None
                rows.append({"run": extra.get("method", path), **extra})
            for run in args.runs:
                rows += run_summary(run)
        except ValueError as e:  # a run without evaluations, a log or --extra file that is not JSON
            sys.exit(f"error: {e}")
    text = table(rows)
    print(text)
    return text


if __name__ == "__main__":
    main()
