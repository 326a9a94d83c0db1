"""dino_recog/run_lock.py: one run per output directory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from dino_recog.run_lock import RunLockedError, lock_output_dir

HOLD = textwrap.dedent("""
    import sys, time
    from dino_recog.run_lock import lock_output_dir
    lock_output_dir(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_process_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError) as refused:
            lock_output_dir(tmp_path)
        assert str(refused.value).startswith(
            f"run.output_dir {tmp_path.resolve()}: another run is writing there (host {socket.gethostname()}, pid "
            f"{holder.pid}, since "
        )
        assert str(refused.value).endswith("); wait for it to end, stop it, or set another run.output_dir")
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        holder.wait()
    previous = lock_output_dir(tmp_path)
    assert previous.startswith(f"host {socket.gethostname()}, pid {holder.pid}, since ")
    assert (tmp_path / ".lock").read_text().startswith(f"host {socket.gethostname()}, pid {os.getpid()}, ")
    assert lock_output_dir(tmp_path) == ""  # this process again: a later run here, not a take-over


def test_training_into_a_held_directory_is_refused_before_it_writes_anything(small_demo, tmp_path):
    from conftest import dino_cfg

    import train_dino

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("the running job's config\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}, since "):
            train_dino.main(dino_cfg(small_demo / "lup" / "images", out))
    finally:
        holder.kill()
        holder.wait()
    assert (out / "config.yaml").read_text() == "the running job's config\n"
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.yaml"]
