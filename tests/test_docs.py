"""Every command and code block of README.md and docs/*.md, run the way a reader would, so that none can rot.

Each fenced block names its language. `text` blocks are output or layout and are not run; every `bash` line and
every `python` block is run, in a folder laid out like a checkout after `make demo` (data/demo, output/demo/dino,
output/demo/recog, ...: the tiny runs of these tests stand in for the demo's), with these substitutions:
- `make T` is dry-run (`make -n T`): the target exists and its recipe expands (the demo itself takes minutes);
- `bash train.sh GPUS N SCRIPT ARGS` on GPUs: the launcher's command line is built (`DRY_RUN=1`, on 2 CPU processes
  here) and the config with the paths it names passes the check train.sh runs before torchrun
  (`dino_recog.preflight`); the training itself is what the learning tests run (tests/test_train_*.py);
- absolute data paths (`/data/...`) become folders of the demo data under the same names, and every data root and
  run directory the docs name exists there;
- `pip install ...` (no download here): the versions it names are the pins of requirements.txt;
- `python -m dino_recog.submit` to SLURM: its options parse and its config passes the check it runs before
  submitting; `srun ... bash train.sh ...`: the train.sh rule;
- `python -m pytest FILES [-k WORD]`: the files exist and the keyword selects at least one of their tests;
- in a command, `[--flag ...]` is given (without the brackets) and `[key=value ...]` is left out;
- every other `python ...` command runs in this interpreter (as `__main__`) and must exit with status 0.
A command of another form fails this test, naming it: add its rule here.
"""

from __future__ import annotations

import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, launcher_env, recog_cfg

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\n(.*?)^```", re.M | re.S)
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def blocks() -> list[tuple[str, str, str]]:
    """(document name, language, text) of every fenced block."""
    return [(path.name, m.group(1), m.group(2)) for path in DOCS for m in FENCE.finditer(path.read_text())]


def commands(text: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(shlex.join(words))
    return out


def test_every_fenced_block_names_a_language_this_test_knows():
    found = [(doc, lang) for doc, lang, _ in blocks()]
    assert found, "no fenced blocks found"
    unknown = [(doc, lang) for doc, lang in found if lang not in ("bash", "python", "text")]
    assert not unknown, f"blocks with no or an unknown language (bash, python or text): {unknown}"


def test_commands_are_split_like_a_shell_does():
    text = "A=1 bash train.sh 0 1 x.py \\\n    'data.train=[{name: a, root: /b}]'   # note\n\nmake test  # x\n"
    assert commands(text) == ["A=1 bash train.sh 0 1 x.py 'data.train=[{name: a, root: /b}]'", "make test"]


def optional_parts(words: list[str]) -> list[str]:
    """`[--json results.json]` -> `--json results.json`; `[key=value ...]` dropped."""
    out, i = [], 0
    while i < len(words):
        w = words[i]
        if w.startswith("[") and not w.startswith("[{"):
            j = i
            while not words[j].endswith("]"):
                j += 1
            part = [x.strip("[]") for x in words[i : j + 1]]
            if part != ["key=value", "..."]:
                out += part
            i = j + 1
        else:
            out.append(w)
            i += 1
    return out


@pytest.fixture(scope="module")
def checkout(small_demo, dino_single, tmp_path_factory) -> Path:
    """A folder laid out like a checkout after `make demo`, with the tiny runs as the demo's outputs."""
    import train_recog

    work = tmp_path_factory.mktemp("checkout")
    lup, market = small_demo / "lup" / "images", small_demo / "market"
    dino = work / "runs" / "dino"  # the tiny stage 1, evaluated on the demo set as the demo preset's is
    dino.mkdir(parents=True)
    for name in ("teacher_backbone.pth", "log.jsonl"):
        shutil.copy(dino_single / name, dino / name)
    config = yaml.safe_load((dino_single / "config.yaml").read_text())
    # the demo preset's eval_set is {name: demo}, which would rebuild a full demo set over the shared small one
    config["data"]["eval_set"] = {"name": "market1501", "root": str(market)}
    (dino / "config.yaml").write_text(yaml.safe_dump(config))
    recog = work / "runs" / "recog"
    train_recog.main(recog_cfg(market, recog, "train.epochs=1"))
    links = {
        "data/demo": small_demo, "data/LUPerson/images": lup, "data/LUPerson/lmdb": lup, "data/lupnl_lmdb": lup,
        "data/market": market, "data/Market-1501-v15.09.15": market, "data/MSMT17_V1": market,
        "output/demo/dino": dino, "output/dino": dino,
        "output/demo/recog": recog, "output/demo/recog_scratch": recog, "output/recog": recog,
        "output/recog_scratch": recog, "output/luperson_nl/vit_small": recog,
    }  # fmt: skip
    for name, target in links.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).symlink_to(target)
    for name in ("train.sh", "train_dino.py", "train_recog.py", "train_usl.py", "eval_reid.py", "eval_knn.py",
                 "cfg_dino.yaml", "cfg_recog.yaml", "cfg_usl.yaml", "configs", "dino_recog", "tests"):  # fmt: skip
        (work / name).symlink_to(ROOT / name)
    queries = sorted((market / "query").glob("*.jpg"))
    (work / "photos").mkdir()
    for i, src in enumerate(queries[:3]):
        shutil.copy(src, work / "photos" / f"p{i}.jpg")
    shutil.copy(queries[0], work / "a.jpg")
    shutil.copy(queries[1], work / "b.jpg")
    return work


def run_in_process(work: Path, words: list[str], monkeypatch) -> None:
    """`python SCRIPT ARGS` / `python -m MODULE ARGS` as __main__ in this interpreter, from `work`."""
    monkeypatch.chdir(work)
    try:
        if words[1] == "-m":
            monkeypatch.setattr(sys, "argv", [words[2], *words[3:]])
            runpy.run_module(words[2], run_name="__main__", alter_sys=True)
        else:
            monkeypatch.setattr(sys, "argv", words[1:])
            runpy.run_path(str(work / words[1]), run_name="__main__")
    except SystemExit as e:
        assert e.code in (0, None), f"{shlex.join(words)}: exit status {e.code}"


def run_command(work: Path, command: str, monkeypatch) -> None:
    words = shlex.split(command)
    env = {}
    while ENV_ASSIGNMENT.match(words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    words = [re.sub(r"(^|root: |=)/data/", rf"\g<1>{work}/data/", w) for w in optional_parts(words)]
    if words[0] == "make":
        r = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f"{command}: {r.stderr}"
    elif words[:2] == ["bash", "train.sh"]:
        gpus, nproc, script, *args = words[2:]
        dry = subprocess.run(["bash", "train.sh", "cpu", str(min(int(nproc), 2)), script, *args], cwd=work,
                             capture_output=True, text=True, env=launcher_env(**env, DRY_RUN="1"))  # fmt: skip
        assert dry.returncode == 0 and "dino_recog.launch" in dry.stdout, f"{command}: {dry.stderr}"
        check = subprocess.run([sys.executable, "-m", "dino_recog.preflight", script, *args], cwd=work,
                               capture_output=True, text=True, env=launcher_env())  # fmt: skip
        assert check.returncode == 0, f"{command}: {check.stderr}"
    elif words[:3] == ["python", "-m", "pytest"]:
        check_pytest_selection(words[3:], command)
    elif words[:2] == ["pip", "install"]:
        pins = set(re.findall(r"^(\S+==\S+)", (ROOT / "requirements.txt").read_text(), re.M))
        named = {w for w in words if "==" in w}
        assert named and named <= pins, f"{command}: {sorted(named - pins)} are not the pins of requirements.txt"
    elif words[:3] == ["python", "-m", "dino_recog.submit"] and "--local" not in words:
        from dino_recog.preflight import check
        from dino_recog.submit import _parser

        args = _parser().parse_args(words[3:])  # a SLURM submission: its options read, its config checked
        monkeypatch.chdir(work)
        assert check(args.script, args.args) is None, f"{command}: {check(args.script, args.args)}"
    elif words[0] == "srun":
        assert words[words.index("bash") + 1] == "train.sh", f"{command}: expected srun ... bash train.sh ..."
        run_command(work, shlex.join(words[words.index("bash") :]), monkeypatch)
    elif words[0] == "python":
        run_in_process(work, words, monkeypatch)
    else:
        pytest.fail(f"no rule in tests/test_docs.py to run the documented command: {command}")


def check_pytest_selection(args: list[str], command: str) -> None:
    """The test files named exist and `-k WORD` selects at least one of their tests (read from the files: a
    pytest run here would take a minute to collect the suite again)."""
    files, keyword, i = [], None, 0
    while i < len(args):
        if args[i] == "-k":
            keyword, i = args[i + 1], i + 2
            continue
        if not args[i].startswith("-"):
            files.append(ROOT / args[i])
        i += 1
    assert files and all(f.is_file() for f in files), f"{command}: names no test file that exists"
    tests = [name for f in files for name in re.findall(r"^def (test_\w+)", f.read_text(), re.M)]
    assert tests, f"{command}: no tests in {files}"
    if keyword is not None:
        assert re.fullmatch(r"\w+", keyword), f"{command}: -k {keyword!r}: only a plain word is checked here"
        assert any(keyword in name for name in tests), f"{command}: -k {keyword} selects none of {tests}"


def python_namespace(work: Path) -> dict:
    """The names the README's Python examples take as given: a model, a batch, a loss, an optimiser, a loader."""
    from PIL import Image

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return {
        "model": model, "images": torch.rand(4, 3, 64, 32), "criterion": lambda out: out.pow(2).mean(),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.01), "train_loader": [None] * 10,
        "pil_image": Image.open(work / "a.jpg"),
    }  # fmt: skip


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy: the tests imported it before
@pytest.mark.slow  # the tools on the tiny runs, and the launcher's dry runs in fresh shells
def test_every_documented_command_runs(checkout, monkeypatch):
    ran = []
    for doc, lang, text in blocks():
        if lang == "bash":
            for command in commands(text):
                run_command(checkout, command, monkeypatch)
                ran.append(command)
        elif lang == "python":
            monkeypatch.chdir(checkout)
            exec(compile(text, f"<{doc}: python block>", "exec"), python_namespace(checkout))
            ran.append(text)
    assert any("eval_knn.py" in c for c in ran) and any("train.sh" in c for c in ran)
    assert (checkout / "pics" / "curves.png").is_file() and (checkout / "feats.npy").is_file()


def test_a_command_that_fails_or_has_no_rule_fails_this_test(tmp_path, monkeypatch):
    with pytest.raises(AssertionError, match=r"^python -m dino_recog.report missing_run: exit status 2"):
        run_command(tmp_path, "python -m dino_recog.report missing_run", monkeypatch)
    with pytest.raises(AssertionError, match=r"-k nothing_like_it selects none of"):
        run_command(tmp_path, "python -m pytest tests/test_docs.py -k nothing_like_it", monkeypatch)
    with pytest.raises(AssertionError, match=r"\['torch==2.0.0'\] are not the pins of requirements.txt"):
        run_command(tmp_path, "pip install torch==2.0.0", monkeypatch)
    with pytest.raises(pytest.fail.Exception, match=r"no rule in tests/test_docs.py .*: docker run x"):
        run_command(tmp_path, "docker run x", monkeypatch)
