"""Summaries of finished runs: the first and last evaluation of each run directory, as one markdown table.

python -m dino_recog.report output/demo/dino output/demo/recog output/demo/recog_scratch
python -m dino_recog.report RUN_DIR ... --extra output/demo/histogram.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .runlog import read_jsonl

__all__ = ["run_summary", "table", "main"]

COLUMNS = ("knn_top1", "rank1", "rank5", "mAP", "mINP")


def run_summary(run_dir: str | Path) -> list[dict]:
    """The first (before training) and the last evaluation record of a run, labelled."""
    evals = read_jsonl(Path(run_dir) / "log.jsonl", "eval")
    if not evals:
        raise ValueError(f"{run_dir}: log.jsonl has no evaluation record; was evaluation switched on?")
    first, last = evals[0], evals[-1]
    rows = []
    if first["epoch"] == 0:
        rows.append({"run": f"{run_dir} (epoch 0, before training)", **first})
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
    parser = argparse.ArgumentParser(description="Summarise runs: first and last evaluation of each run directory.")
    parser.add_argument("runs", nargs="+", help="run directories holding log.jsonl")
    parser.add_argument("--extra", nargs="*", default=[], help="JSON files with a 'method' and metrics to add as rows")
    args = parser.parse_args(argv)
    rows = []
    for path in args.extra:
        extra = json.loads(Path(path).read_text())
        rows.append({"run": extra.get("method", path), **extra})
    for run in args.runs:
        rows += run_summary(run)
    text = table(rows)
    print(text)
    return text


if __name__ == "__main__":
    main()
