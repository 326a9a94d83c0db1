#!/usr/bin/env bash
# Reference for bench/pseudo_labels.py: the published cluster-contrast `compute_jaccard_distance`, taken from a checkout
# of alibaba/cluster-contrast-reid given on the command line (a work tree or a bare git directory; it is not on PyPI).
# Only clustercontrast/utils/faiss_rerank.py and the faiss_utils.py it imports are copied, into a package of their
# own, bench/.cluster-contrast-ref/ (git-ignored, never committed); they need nothing beyond numpy, scipy, torch and
# faiss, which the project's environment has, so no second virtual environment is made.
#
#   bash bench/cluster_contrast_env.sh /path/to/cluster-contrast-reid
set -euo pipefail
src=${1:?usage: bash bench/cluster_contrast_env.sh /path/to/cluster-contrast-reid (a checkout or its .git)}
dest="$(cd "$(dirname "$0")" && pwd)/.cluster-contrast-ref/clustercontrast_utils"
mkdir -p "$dest"
for name in faiss_rerank faiss_utils; do
    if [ -f "$src/clustercontrast/utils/$name.py" ]; then
        cp "$src/clustercontrast/utils/$name.py" "$dest/$name.py"
    else  # a bare repository (e.g. a mirror): read the file from its HEAD
        git --git-dir="$src" show "HEAD:clustercontrast/utils/$name.py" > "$dest/$name.py"
    fi
done
: > "$dest/__init__.py"
commit=$(git -C "$src" rev-parse HEAD 2>/dev/null || git --git-dir="$src" rev-parse HEAD)
echo "$commit" > "$dest/COMMIT"
echo "cluster-contrast-reid $commit -> $dest"
