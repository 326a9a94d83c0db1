from types import SimpleNamespace

import pytest
from conftest import train_sh

from dino_recog.launch import ERROR_DIR_ENV, record_worker_error, worker_messages


def failure(pid, exitcode=2):
    return SimpleNamespace(pid=pid, exitcode=exitcode)


def test_worker_messages_name_each_line_once_with_its_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv(ERROR_DIR_ENV, str(tmp_path))
    monkeypatch.setattr("os.getpid", lambda: 11)
    record_worker_error("error: a")
    (tmp_path / "12.txt").write_text("error: a\n")
    (tmp_path / "14.txt").write_text("error: b")
    failures = {2: failure(12), 0: failure(11), 3: failure(14), 1: failure(13, exitcode=1), 4: failure(15, -15)}
    assert worker_messages(tmp_path, failures) == [
        "rank 1 failed with exit status 1 (its output is above)",
        "error: a  [ranks 0, 2]",
        "error: b  [rank 3]",
    ]
    # no failed worker left a line (a bug, a kill): nothing, and torchrun's own report stays
    assert worker_messages(tmp_path, {0: failure(99, exitcode=-9)}) == []


def test_record_worker_error_outside_the_launcher_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(ERROR_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    record_worker_error("error: x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_worker_error_under_train_sh_is_the_last_line_not_torchruns_report():
    r = train_sh("cpu", 2, "tests/scripts/worker_error.py")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last == "error: data.train.root /nowhere/images: no such folder  [rank 1]", r.stderr[-3000:]
    assert "rank 0" not in r.stderr  # stopped by torchrun once rank 1 had failed: not a cause
    assert "ChildFailedError" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
