#!/usr/bin/env bash
# What bench/gpu_suite.sh needs on a GPU machine that cannot download: the official DINO code and the wheels its
# image lacks, put in git-ignored folders that travel with the working tree (the device tool's `carry`).
#
#     DINO_SRC=/path/to/facebookresearch/dino bash bench/gpu_env.sh   # a checkout, or a bare git directory
#
# - bench/.official-dino/: main_dino.py, utils.py, vision_transformer.py (+ LICENSE) of facebookresearch/dino, as
#   fetched: never committed here, loaded by path by bench/dino_step.py and bench/augment.py (--official).
# - bench/.gpu-wheels/: lmdb (imported by dino_recog.data, absent from the GPU image) and timm at the version of
#   this project's venv, for CPython 3.12 on x86-64 (the GPU image's python3); gpu_suite.sh installs them
#   into /tmp/site there. About 3 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
: "${DINO_SRC:?set DINO_SRC to a checkout (or bare git directory) of facebookresearch/dino}"
FILES="main_dino.py utils.py vision_transformer.py LICENSE"
rm -rf bench/.official-dino && mkdir -p bench/.official-dino
if [ -f "$DINO_SRC/main_dino.py" ]; then
    for f in $FILES; do cp "$DINO_SRC/$f" bench/.official-dino/; done
else
    git --git-dir="$DINO_SRC" archive HEAD $FILES | tar -x -C bench/.official-dino
fi
TIMM=$("$PYTHON" -c "import timm; print(timm.__version__)")
LMDB=$("$PYTHON" -c "import lmdb; print(lmdb.__version__)")
rm -rf bench/.gpu-wheels
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d bench/.gpu-wheels "timm==$TIMM" "lmdb==$LMDB"
ls bench/.official-dino bench/.gpu-wheels
