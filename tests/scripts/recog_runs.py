"""Several train_recog.py runs one after another in one torchrun launch (one process group, one interpreter start),
for tests/test_fsdp.py (never used in production).

    bash train.sh cpu 2 tests/scripts/recog_runs.py RUNS.json

RUNS.json is a list of {"overrides": [key=value, ...], "nan_at": N (optional), "resume_from": DIR (optional)}:
each entry is train_recog.main on cfg_recog.yaml with those overrides. With `nan_at`, the triplet loss of rank 1, and
of no other rank, is NaN at its N-th evaluation of that run (from 0), once: a step that run.skip_nonfinite_steps can
skip. With `resume_from`, that run's epoch-1 checkpoint (and its Partial FC shard files) is first copied into the
run's output directory, as a run that died in its second epoch leaves it. Each run writes `gathered_steps.json` to
its output directory: the training steps of rank 0 that began with a trainable parameter gathered (a full tensor, not
this rank's DTensor shard): a network left gathered by the step before.
"""

import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import train_recog  # noqa: E402
from dino_recog import config as C  # noqa: E402
from dino_recog import distributed as dist  # noqa: E402
from dino_recog.losses import TripletLoss  # noqa: E402
from dino_recog.tasks.reid import ReIDTask  # noqa: E402


def main(runs: list[dict]) -> None:
    rank = int(os.environ["RANK"])
    forward, calls, nan_at = TripletLoss.forward, [0], [-1]

    def faulty(self, features, labels):
        loss = forward(self, features, labels)
        n, calls[0] = calls[0], calls[0] + 1
        return loss * float("nan") if rank == 1 and n == nan_at[0] else loss

    TripletLoss.forward = faulty
    task_forward, gathered = ReIDTask.forward, []

    def recording_forward(self, batch, step):
        if self.run_sharded and not all(dist.is_dtensor(p) for p in self.trainable.parameters()):
            gathered.append(step.iteration)
        return task_forward(self, batch, step)

    ReIDTask.forward = recording_forward
    shutdown, dist.shutdown = dist.shutdown, lambda: None  # one process group for all the runs
    dist.init("cpu")
    try:
        for run in runs:
            cfg = C.load(ROOT / "cfg_recog.yaml", run["overrides"], cls=C.RecogConfig)
            out = Path(cfg.run.output_dir)
            if "resume_from" in run and rank == 0:
                out.mkdir(parents=True)
                for f in Path(run["resume_from"]).glob("checkpoint_0001.*"):
                    shutil.copy(f, out / f.name)
            dist.barrier()
            calls[0], nan_at[0] = 0, run.get("nan_at", -1)
            gathered.clear()
            ReIDTask.run_sharded = cfg.run.parallel == "fsdp"
            train_recog.main(cfg)
            if rank == 0:
                (out / "gathered_steps.json").write_text(json.dumps(gathered))
    finally:
        shutdown()


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
