import json
import os
import subprocess

import pytest
import torch
from conftest import ROOT, launcher_env

from dino_recog import distributed as D


def launch(*args, env=None, timeout=600):
    """`bash train.sh ARGS` as conftest.train_sh runs it, but with train.sh's own choice of threads per process."""
    return subprocess.run(
        ["bash", str(ROOT / "train.sh"), *map(str, args)],
        cwd=ROOT,
        env=launcher_env(OMP_NUM_THREADS=None, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_two_cpu_processes_run_collectives(tmp_path):
    r = launch("cpu", 2, "tests/scripts/dist_check.py", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for i, res in enumerate(results):
        assert res["rank"] == i and res["world"] == 2
        assert res["sum"] == 3.0  # (1 + 2) summed over ranks
        # rank 0 had 2 rows, rank 1 had 3: gathered in rank order, padding removed
        assert res["gathered"] == [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]]
        assert res["seed"] == 7 + i  # a seed per rank
        assert res["broadcast"] == {"from": 0}
        assert res["threads"] == max(1, (os.cpu_count() or 1) // 2)  # the CPU cores shared between processes


@pytest.mark.parametrize(
    "args, message",
    [
        (("0,1", 3, "tests/scripts/dist_check.py"), "NPROC=3 is larger than the 2 GPU id(s) given in '0,1'"),
        (
            ("gpu", 1, "tests/scripts/dist_check.py"),
            "GPUS must be comma-separated GPU ids like 0,1,2,3 or 'cpu', got 'gpu'",
        ),
        (("0,,1", 1, "tests/scripts/dist_check.py"), "GPUS must be comma-separated GPU ids"),
        (("cpu", 0, "tests/scripts/dist_check.py"), "NPROC must be a positive integer, got '0'"),
        (("cpu", 2, "no_such_script.py"), "script not found: no_such_script.py"),
        (("cpu", 2), "usage: bash train.sh GPUS NPROC SCRIPT [ARGS...]"),
    ],
)
def test_launcher_errors_are_one_clear_line(args, message):
    r = launch(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is absent")
def test_gpus_without_cuda_suggest_cpu(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("")
    r = launch("0", 1, script)
    assert r.returncode == 2
    assert "CUDA is not available here; use 'cpu' instead" in r.stderr


def test_multi_node_variables(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("")
    r = launch(
        "cpu",
        2,
        script,
        "a=1",
        env={
            "NNODES": "2",
            "NODE_RANK": "1",
            "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "1234",
            "DRY_RUN": "1",
            "MAX_RESTARTS": "3",
        },
    )
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.strip()
    for part in (
        "--nproc_per_node 2",
        "--nnodes 2",
        "--node_rank 1",
        "--master_addr 10.0.0.1",
        "--master_port 1234",
        "--max_restarts 3",
        f"{script} a=1",
    ):
        assert part in cmd
    assert "--standalone" not in cmd
    r = launch("cpu", 2, script, env={"NNODES": "2", "DRY_RUN": "1"})
    assert r.returncode == 2 and "NNODES=2 needs MASTER_ADDR" in r.stderr
    r = launch("cpu", 2, script, env={"DRY_RUN": "1"})
    assert "--standalone" in r.stdout  # single node: torchrun picks a free port


def test_single_process_without_process_group():
    assert not D.is_initialized()
    assert D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
    t = torch.arange(6.0).reshape(3, 2)
    assert D.all_gather_variable(t)[0] is t
    assert torch.equal(D.all_reduce_mean(t), t)
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    D.barrier()
    with D.session("cpu") as dev:
        assert dev == torch.device("cpu")
    assert not D.is_initialized()


def test_loader_workers_are_capped_at_the_process_share_of_the_cpus(monkeypatch, caplog):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with caplog.at_level("INFO", logger="dino_recog.distributed"):
        assert D.loader_workers(10) == 2  # the official default, on 4 CPUs shared by 2 processes
    assert "data.num_workers 10 capped at 2: this process's share of the 4 CPUs" in caplog.text
    assert D.loader_workers(1) == 1 and D.loader_workers(0) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert D.loader_workers(4) == 1  # more processes than CPUs: one worker each, not none


def test_log_lines_with_odd_file_names_or_on_a_full_disk_are_not_tracebacks(tmp_path, capsys, monkeypatch):
    """A name that is not UTF-8 (surrogate-escaped) was a logging traceback in place of the line; a full disk was one
    traceback per line. Now: the line, the name escaped; one warning for the full disk."""
    import errno
    import logging

    D.setup_logging(str(tmp_path))
    log = logging.getLogger("dino_recog.test")
    try:
        log.warning("cannot read image %s", os.fsdecode(b"/data/\xff\xfe.jpg"))
        (file_handler,) = [h for h in logging.getLogger("dino_recog").handlers if isinstance(h, logging.FileHandler)]
        file_handler.flush()
        assert "cannot read image /data/\\udcff\\udcfe.jpg" in (tmp_path / "log.txt").read_text(encoding="utf-8")

        def full(*args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(file_handler.stream, "write", full)
        for i in range(3):
            log.warning("line %d", i)
        err = capsys.readouterr().err
        assert "Logging error" not in err and "Traceback" not in err
        assert err.count(f"warning: {tmp_path / 'log.txt'}: No space left on device; lines are missing from it") == 1
        assert "line 2" in err  # stderr still gets every line
    finally:
        for h in list(logging.getLogger("dino_recog").handlers):
            logging.getLogger("dino_recog").removeHandler(h)
            h.close()


def test_a_log_file_whose_folder_is_gone_is_one_warning_not_an_exception(tmp_path, capsys):
    """FileHandler reopens a closed file outside its error handling: with the folder gone, every log line raised."""
    import logging
    import shutil

    D.setup_logging(str(tmp_path / "run"))
    log = logging.getLogger("dino_recog.test")
    try:
        (file_handler,) = [h for h in logging.getLogger("dino_recog").handlers if isinstance(h, logging.FileHandler)]
        file_handler.close()  # the stream is reopened by the next line
        shutil.rmtree(tmp_path / "run")
        for i in range(3):
            log.warning("line %d", i)
        err = capsys.readouterr().err
        assert err.count("lines are missing from it from here on") == 1 and "line 2" in err
    finally:
        for h in list(logging.getLogger("dino_recog").handlers):
            logging.getLogger("dino_recog").removeHandler(h)
            h.close()
