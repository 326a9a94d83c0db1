"""A worker that stops on a mistake its user can fix: rank 1 raises a user error, rank 0 keeps running until
torchrun stops it (as a rank waiting in a collective would)."""

import os
import time

from dino_recog.user_errors import user_errors

with user_errors():
    if os.environ["RANK"] == "1":
        raise FileNotFoundError("data.train.root /nowhere/images: no such folder")
    time.sleep(120)
