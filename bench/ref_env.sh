#!/usr/bin/env bash
# Reference environment for the benchmarks: the published fast-reid and torchreid packages from PyPI, so that
# bench/eval_rank.py --reference and bench/rerank.py time *their* code. Only the files that need nothing but NumPy are
# used, loaded by file path (bench/reference.py), hence --no-deps: fastreid pins torch==1.13.1 (gigabytes) and its
# package __init__ imports torch, sklearn and faiss.
#
#   bash bench/ref_env.sh            # creates bench/.venv-ref (git-ignored)
#
# fastreid 1.4.0: JDAI-CV/fast-reid as a pure-Python wheel (rank.py, rerank.py; no compiled rank_cy).
# torchreid 0.2.5: the PyPI name holds "Torchreid-Pip" (kadirnar), a repackaging of KaiyangZhou/deep-person-reid
# under torchreid.reid.*; its metrics/rank.py and utils/rerank.py have the same logic as the official torchreid, which
# is not on PyPI. No rank_cy is shipped, so its evaluation is the pure-Python path.
set -euo pipefail
cd "$(dirname "$0")"
"${PYTHON:-python3}" -m venv .venv-ref
.venv-ref/bin/python -m pip install --quiet --no-deps fastreid==1.4.0 torchreid==0.2.5
.venv-ref/bin/python -m pip list --format=freeze | grep -iE '^(fastreid|torchreid)=='
