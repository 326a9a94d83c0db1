"""Run records: metrics as JSON lines (`log.jsonl`) and tensorboard scalars, written by rank 0 only."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from . import distributed as dist

__all__ = ["RunLog", "read_jsonl", "fmt_metrics"]


class RunLog:
    """Append metric records to OUTPUT/log.jsonl and OUTPUT/tb/; a no-op on ranks other than 0.

    Each record is one JSON object with `kind` (e.g. "train", "epoch", "eval"), `step` and plain numbers, so that
    curves can be drawn from the file alone. A resumed run appends a "resume" record with the iteration it continues
    from, then the records of the steps it repeats; `read_jsonl` drops the older records of those steps.
    """

    def __init__(self, output_dir: str | os.PathLike, tensorboard: bool = True) -> None:
        self.active = dist.is_main_process()
        self.path = Path(output_dir) / "log.jsonl"
        self.writer = None
        if self.active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow, and rank 0 only

                self.writer = SummaryWriter(str(Path(output_dir) / "tb"))

    def write(self, kind: str, step: int, **values: float) -> None:
        if not self.active:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3)}
        record.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()})
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_jsonl(path: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """The records of a log.jsonl, optionally only those of one `kind`. A last line cut short (a run killed while
    writing it) is skipped with a warning; a bad line elsewhere is a ValueError naming the file and line.

    A "resume" record at iteration R drops the records before it that come after R: what the crashed run logged
    after its last checkpoint, which the resumed run repeats (or never reaches). A "train" record at step s was
    written after iteration s (s + 1 done); "epoch" and "eval" records at step s describe s done iterations."""
    lines = [(i, line) for i, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1) if line.strip()]
    records = []
    for i, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i != lines[-1][0]:
                raise ValueError(f"{path}, line {i}: not a JSON record ({e.msg})") from None
            logging.getLogger(__name__).warning("%s: skipped its last line %d, cut short (%s)", path, i, e.msg)
            continue
        if record.get("kind") == "resume":
            records = [r for r in records if _iterations_done(r) <= record["step"]]
        records.append(record)
    return [r for r in records if kind is None or r.get("kind") == kind]


def _iterations_done(record: dict) -> int:
    return record["step"] + 1 if record.get("kind") == "train" else record["step"]


def fmt_metrics(d: dict) -> str:
    """`key value, ...` with 4 significant digits, for log lines."""
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())
