"""Shared fixtures and the tiny end-to-end runs: settings, config builders and the `bash train.sh` launcher.

Test files import the helpers with `from conftest import ...` (tests/ is on the pythonpath, pyproject.toml).
"""

from __future__ import annotations

import os

# Set before torch is imported, which reads it when its OpenMP runtime starts: threads that wait for the others at the
# end of a parallel region sleep instead of spinning. Spinning, a process with 2 threads on 2 cores that other jobs
# share spends most of its time waiting for a thread that is not running: measured at a load of 3 to 4 on 2 cores,
# test_wrapper's learning test took 196-224 s with spinning threads, 11 s with sleeping ones (and 11 s with one
# thread). The number of threads, hence every result, stays what it was.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import fcntl  # noqa: E402
import logging  # noqa: E402
import runpy  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from dino_recog import config as C  # noqa: E402
from dino_recog.data.demo import generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the entry scripts (train_dino.py, ...) live at the root of the checkout
    sys.path.insert(0, str(ROOT))

# A 2-block, 32-wide ViT with 8-pixel patches: the backbone of every tiny run.
TINY_VIT = ["model.arch=vit_small", "model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8"]

# Stage 1 on 32x16 / 16x8 crops, 8 images a step (12 steps an epoch on the small demo pool), 2 epochs, fp32, a log
# record every step, a teacher export every epoch, no evaluation; only run.keep_last prunes checkpoints.
DINO_TINY = [
    *TINY_VIT, "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16", "model.drop_path_rate=0.1",
    "crops.global_crops_size=[32,16]", "crops.local_crops_size=[16,8]", "crops.local_crops_number=2",
    "data.batch_size_per_gpu=8", "data.num_workers=0", "train.epochs=2", "train.warmup_epochs=1",
    "run.log_every=1", "run.amp=fp32", "eval.eval_every=0", "eval.export_every=1", "eval.saveckp_freq=0",
]  # fmt: skip

# Stage 2 from random initialisation on 32x16 images, P x K = 8 x 4, AdamW, 2 epochs, fp32, a log record every step,
# evaluated at the end only.
RECOG_TINY = [
    *TINY_VIT, "model.pretrained=", "aug.size=[32,16]", "aug.padding=2", "data.num_identities=8",
    "data.num_instances=4", "data.num_workers=0", "data.test_batch_size=64", "train.optimizer=adamw", "train.lr=0.003",
    "train.weight_decay=0.01", "train.epochs=2", "train.warmup_epochs=1", "run.log_every=1", "run.amp=fp32",
    "eval.eval_every=0",
]  # fmt: skip


def dino_args(images: Path, out: Path, *extra: str) -> list[str]:
    """The tiny stage-1 run on the image folder `images`, writing to `out`; `extra` overrides come last."""
    return [*DINO_TINY, f"data.train={{name: image_folder, root: {images}}}", f"run.output_dir={out}", *extra]


def dino_cfg(images: Path, out: Path, *extra: str) -> C.DinoConfig:
    return C.load(ROOT / "cfg_dino.yaml", dino_args(images, out, *extra), cls=C.DinoConfig)


def recog_args(market: Path, out: Path, *extra: str) -> list[str]:
    """The tiny stage-2 run, trained and evaluated on the Market-1501 folder `market`, writing to `out`."""
    data = [f"data.train=[{{name: market1501, root: {market}}}]", f"data.test={{name: market1501, root: {market}}}"]
    return [*RECOG_TINY, *data, f"run.output_dir={out}", *extra]


def recog_cfg(market: Path, out: Path, *extra: str) -> C.RecogConfig:
    return C.load(ROOT / "cfg_recog.yaml", recog_args(market, out, *extra), cls=C.RecogConfig)


def launcher_env(**extra: str | None) -> dict[str, str]:
    """This process's environment for `bash train.sh`, without multi-node variables (nor SLURM's, from which
    train.sh would fill them when the tests run in a SLURM job); PYTHON is this interpreter (train.sh would look for
    .venv next to the checkout) and each CPU process gets one thread."""
    multi_node = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in multi_node and not k.startswith("SLURM")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}  # NAME=None: unset (OMP_NUM_THREADS=None: train.sh picks)


def train_sh(*args: object, timeout: int = 600, **env: str | None) -> subprocess.CompletedProcess:
    """`bash train.sh ARGS` from the root of the checkout; `env` adds environment variables. The timeout only stops a
    hung run: a loaded machine may take several times longer than an idle one."""
    return subprocess.run(["bash", "train.sh", *map(str, args)], cwd=ROOT, env=launcher_env(**env),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.fixture
def run_script(monkeypatch):
    """`run_script("eval_reid.py", *args)`: `python eval_reid.py ARGS` (a script at the root of the checkout) in this
    interpreter, as __main__: the code of the command line without a new interpreter's start-up (about 9 s on 2 cores
    for torch, torchvision and timm). Each entry point keeps a test that runs it in a fresh interpreter."""

    def run(script: str, *args: object) -> None:
        monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
        monkeypatch.chdir(ROOT)
        runpy.run_path(str(ROOT / script), run_name="__main__")

    return run


def pytest_collection_modifyitems(items):
    """Tests marked slow run for minutes where other jobs share the cores: they get a hang guard of 15 minutes instead
    of the default 5 (pyproject.toml), unless they set their own.

    The longest tests go first, so that with `pytest -n 2` (make test) no worker is left running a minute-long test
    after the other one has finished: the learning runs on the full demo set, then the rest marked slow, then the
    others, each group in the order of collection."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(900))
    items.sort(key=lambda item: (not item.get_closest_marker("slow"), "demo_set" not in item.fixturenames))


def pytest_configure(config):
    """pytest-xdist hands out tests 2 at a time (`--maxschedchunk 1`), so that the order above is the order in which
    the workers take them. By default its first hand-out gives each worker a quarter of its share in one block: the
    first worker got every test marked slow (the first ~40 of the order) and ran them one after the other, minutes
    after the second had finished the rest. An explicit --maxschedchunk on the command line wins."""
    if config.pluginmanager.hasplugin("xdist") and config.getoption("maxschedchunk", None) is None:
        config.option.maxschedchunk = 1


@pytest.fixture(autouse=True)
def _log_handlers_stay_with_their_test():
    """A run's log handlers (stderr, its log.txt) are removed when its test ends: a run stopped by an error (a full
    disk on a file system the test then unmounts) leaves them installed, and the next test's lines would go there."""
    logger = logging.getLogger("dino_recog")
    before = list(logger.handlers)
    yield
    for handler in [h for h in logger.handlers if h not in before]:
        logger.removeHandler(handler)
        handler.close()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report):
    """Captured output and log lines naming a file whose name is not UTF-8 (surrogate-escaped, as the tests of such
    names log them) escaped, before pytest-xdist sends the report to the controller: it cannot send such strings."""
    report.sections = [(title, text.encode("utf-8", "backslashreplace").decode("utf-8"))
                       for title, text in report.sections]  # fmt: skip


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `name` filled by `build(folder)` once per test session, also when pytest-xdist splits the session
    over several worker processes: the first worker that asks builds it under a lock in the folder the workers share,
    the others wait for it and reuse it. A build that fails leaves no mark of completion, so the next one retries."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    shared = tmp_path_factory.getbasetemp().parent  # pytest-N/, the parent of every worker's popen-gwK/
    out, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, also if this worker dies
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """A small demo set (Market-1501 layout + unlabeled pool), generated once per test session."""
    return built_once(tmp_path_factory, "demo", lambda root: generate(
        root, seed=3, train_ids=30, test_ids=15, unlabeled_ids=16, distractors=4, junk=2))  # fmt: skip


@pytest.fixture(scope="session")
def demo_set(tmp_path_factory):
    """The full default demo set (about 5,000 images, ~10 s to generate), once per test session."""
    from dino_recog.data.demo import ensure_demo

    return built_once(tmp_path_factory, "full", lambda root: ensure_demo(root / "demo")) / "demo"


@pytest.fixture(scope="session")
def dino_single(small_demo, tmp_path_factory) -> Path:
    """The tiny stage 1 in this process, uninterrupted: 2 epochs of 12 steps, a checkpoint every 5 steps, all kept."""
    import train_dino

    args = ("run.save_every_steps=5", "run.keep_last=20")
    return built_once(tmp_path_factory, "dino_single", lambda out: train_dino.main(
        dino_cfg(small_demo / "lup" / "images", out, *args)))  # fmt: skip


DINO_2PROC = ["run.save_every_steps=4", "run.keep_last=2"]  # 2 processes: 6 steps per epoch, 12 in all


@pytest.fixture(scope="session")
def dino_2proc(small_demo, tmp_path_factory) -> Path:
    """The tiny stage 1 with 2 CPU processes through train.sh, uninterrupted (DINO_2PROC)."""

    def build(out: Path) -> None:
        r = train_sh("cpu", 2, "train_dino.py", *dino_args(small_demo / "lup" / "images", out, *DINO_2PROC))
        assert r.returncode == 0, r.stderr[-4000:]

    return built_once(tmp_path_factory, "dino_2proc", build)


@pytest.fixture(scope="session")
def dino_2proc_accum(small_demo, tmp_path_factory) -> Path:
    """dino_2proc with 2 accumulated batches a step (3 optimiser steps an epoch), uninterrupted: the DDP side of the
    FSDP accumulation test and the accumulation test of tests/test_train_dino.py."""

    def build(out: Path) -> None:
        args = dino_args(small_demo / "lup" / "images", out, *DINO_2PROC, "train.accumulate_steps=2")
        r = train_sh("cpu", 2, "train_dino.py", *args)
        assert r.returncode == 0, r.stderr[-4000:]

    return built_once(tmp_path_factory, "dino_2proc_accum", build)
