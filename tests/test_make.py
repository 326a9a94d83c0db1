"""The Makefile's own logic (what `make -n` prints; nothing is installed)."""

import re
import subprocess

from conftest import ROOT


def make_n(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", "-B", "venv", *args], cwd=ROOT, capture_output=True, text=True)


def test_torch_cpu_installs_the_pinned_cpu_build_first():
    pins = re.findall(r"^(torch(?:vision)?==\S+)", (ROOT / "requirements.txt").read_text(), re.M)
    assert sorted(pins) == ["torch==2.14.1", "torchvision==0.29.1"]
    lines = make_n("TORCH=cpu").stdout.splitlines()
    cpu = [i for i, line in enumerate(lines) if "--index-url https://download.pytorch.org/whl/cpu" in line]
    reqs = [i for i, line in enumerate(lines) if line.endswith("-r requirements.txt")]
    assert len(cpu) == 1 and lines[cpu[0]].endswith(" ".join(pins)) and cpu[0] < reqs[0]
    assert "--index-url" not in make_n().stdout  # by default pip's own choice, as before


def test_an_unknown_torch_build_is_refused():
    r = make_n("TORCH=cuda")
    assert r.returncode == 2
    assert "TORCH=cuda: expected TORCH=cpu (the CPU-only build of torch) or nothing (pip's default build)" in r.stderr
