"""The reference implementations for the benchmarks (and an optional test): files of the published fast-reid and
torchreid packages, loaded by path from bench/.venv-ref (made by `bash bench/ref_env.sh`), never copied here.

Only files that need nothing beyond NumPy (and torch, for fast-reid's query expansion) are loaded; the packages'
`__init__` files are not run, as fast-reid's imports torch 1.13-era evaluators, sklearn and faiss.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from types import ModuleType

VENV = Path(__file__).resolve().parent / ".venv-ref"
FILES = {
    "fastreid.rank": "fastreid/evaluation/rank.py",  # evaluate_rank -> eval_market1501 (Python path, no rank_cy)
    "fastreid.rerank": "fastreid/evaluation/rerank.py",  # re_ranking
    "fastreid.query_expansion": "fastreid/evaluation/query_expansion.py",  # aqe
    "torchreid.rank": "torchreid/reid/metrics/rank.py",  # evaluate_rank -> eval_market1501 (no rank_cy shipped)
    "torchreid.rerank": "torchreid/reid/utils/rerank.py",  # re_ranking
}


def site_packages() -> Path | None:
    found = sorted(VENV.glob("lib/python*/site-packages"))
    return found[0] if found else None


def available(name: str) -> bool:
    site = site_packages()
    return site is not None and (site / FILES[name]).is_file()


def load(name: str) -> ModuleType:
    """The module `name` (a key of FILES) from the reference environment."""
    if not available(name):
        raise FileNotFoundError(f"{name} not found under {VENV}: run `bash bench/ref_env.sh` first")
    spec = importlib.util.spec_from_file_location("reference_" + name.replace(".", "_"), site_packages() / FILES[name])
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():  # "Cython evaluation ... unavailable, now use python evaluation": known, wanted
        warnings.simplefilter("ignore")
        spec.loader.exec_module(module)
    return module
