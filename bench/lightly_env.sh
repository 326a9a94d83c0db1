#!/usr/bin/env bash
# Creates bench/.venv-lightly: lightly, for bench/augment.py only (it is not a dependency of dino_recog).
#
#     bash bench/lightly_env.sh            # PYTHON=/path/to/project/python to choose the project interpreter
#
# The venv sees the project venv's packages through a .pth file, so lightly runs on exactly the torch, torchvision,
# Pillow and numpy that our transform runs on: the benchmark compares the two augmentation pipelines, not two
# library builds (and nothing of several GB is installed twice). lightly itself is installed without its declared
# dependencies: its transforms import only torch, torchvision, PIL, numpy and lightning-utilities (a small
# pure-Python package, installed here); pytorch_lightning and hydra serve its training utilities, not used here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
LIGHTLY_VERSION=${LIGHTLY_VERSION:-1.6.0}
VENV=bench/.venv-lightly

SITE=$("$PYTHON" -c "import site; print(site.getsitepackages()[0])")
"$PYTHON" -m venv --clear "$VENV"
NEW_SITE=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
echo "$SITE" > "$NEW_SITE/_project_packages.pth"
"$VENV/bin/python" -m pip install --quiet --no-deps "lightly==$LIGHTLY_VERSION" lightning-utilities
"$VENV/bin/python" -c "import lightly, torch; from lightly.transforms import DINOTransform; \
print('lightly', lightly.__version__, 'torch', torch.__version__, 'in', '$VENV')"
