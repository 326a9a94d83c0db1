"""train_dino.py with one injected fault, for tests/test_reliability.py (never used in production).

    bash train.sh cpu 2 tests/scripts/faults.py MODE STEP [key.sub=value ...]

MODE
  die  rank 1 SIGKILLs itself at its training step STEP, in the first attempt only (torchrun's
       TORCHELASTIC_RESTART_COUNT is 0): a worker that dies, as on a lost node. With MAX_RESTARTS >= 1, torchrun stops
       the other worker and starts both again; they resume from the last checkpoint (run.resume: auto).
  nan  the DINO loss of rank 1, and of no other rank, is NaN at its training step STEP (and after it).
  nan1 the same at step STEP only (a step that run.skip_nonfinite_steps can skip).

STEP counts the DINO loss evaluations of the process, from 0. The overrides are those of train_dino.py (cfg_dino.yaml).
"""

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import train_dino  # noqa: E402
from dino_recog import config as C  # noqa: E402
from dino_recog.losses import DINOLoss  # noqa: E402


def main(mode: str, step: int, overrides: list[str]) -> None:
    rank = int(os.environ["RANK"])
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    forward, calls = DINOLoss.forward, [0]

    def faulty(self, student_out, teacher_out, teacher_temp):
        loss = forward(self, student_out, teacher_out, teacher_temp)
        n, calls[0] = calls[0], calls[0] + 1
        if rank == 1 and mode == "die" and first_attempt and n == step:
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == 1 and (mode == "nan" and n >= step or mode == "nan1" and n == step):
            return loss * float("nan")
        return loss

    DINOLoss.forward = faulty
    train_dino.main(C.load(ROOT / "cfg_dino.yaml", overrides, cls=C.DinoConfig))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
