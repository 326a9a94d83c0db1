"""dino_recog/runlog.py: reading log.jsonl back after a resume."""

import json

from dino_recog.runlog import read_jsonl


def write(path, *records):
    path.write_text("".join(json.dumps(dict(zip(("kind", "step", "loss"), r))) + "\n" for r in records))


def test_a_resume_record_drops_what_the_crashed_run_logged_after_the_checkpoint(tmp_path):
    # 4 iterations an epoch; the run crashed in iteration 6 after the checkpoint at the end of epoch 1 (4 done) and
    # the evaluation of epoch 1; the resumed run repeats iterations 4 and 5 with other losses, then crashes again
    # (before iteration 6), resumes from its checkpoint at iteration 5 (5 done) and finishes epoch 2.
    log = tmp_path / "log.jsonl"
    write(log,
          ("train", 2, 1.0), ("train", 3, 1.0), ("epoch", 4, 1.0), ("eval", 4, 0.5), ("train", 4, 9.0),
          ("train", 5, 9.0), ("resume", 4), ("train", 4, 2.0), ("train", 5, 2.0), ("resume", 5), ("train", 5, 3.0),
          ("train", 6, 3.0), ("train", 7, 3.0), ("epoch", 8, 3.0))  # fmt: skip
    got = [(r["kind"], r["step"], r.get("loss")) for r in read_jsonl(log) if r["kind"] != "resume"]
    assert got == [("train", 2, 1.0), ("train", 3, 1.0), ("epoch", 4, 1.0), ("eval", 4, 0.5), ("train", 4, 2.0),
                   ("train", 5, 3.0), ("train", 6, 3.0), ("train", 7, 3.0), ("epoch", 8, 3.0)]  # fmt: skip
    assert [r["step"] for r in read_jsonl(log, "resume")] == [4, 5]
    assert [r["step"] for r in read_jsonl(log, "train")] == [2, 3, 4, 5, 6, 7]
