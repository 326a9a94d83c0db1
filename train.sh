#!/usr/bin/env bash
# Launch a dino_recog script with torchrun.
#
#   bash train.sh GPUS NPROC SCRIPT [ARGS...]
#
#   bash train.sh 0,1,2,3 4 train_dino.py                    # 4 GPUs on this machine (nccl)
#   bash train.sh 0,1,2,3 4 train_recog.py --config configs/market1501/vit_small.yaml train.epochs=60
#   bash train.sh cpu 2 train_dino.py --config configs/demo/dino.yaml   # 2 CPU processes (gloo)
#
# GPUS   comma-separated GPU ids (exported as CUDA_VISIBLE_DEVICES), or "cpu".
# NPROC  processes on this node; at most the number of GPU ids given.
# SCRIPT a Python script; ARGS are passed to it unchanged.
#
# Environment (all optional):
#   NNODES, NODE_RANK        multi-node: number of nodes and this node's index (0 on the master node)
#   MASTER_ADDR, MASTER_PORT multi-node: address and port of node 0 (required when NNODES > 1)
#   MAX_RESTARTS             torchrun elastic restarts of the whole worker group after a failure (default 0);
#                            with `run.resume: auto` a restarted job continues from the last checkpoint
#   PYTHON                   interpreter to use (default: .venv/bin/python next to this file, else python3)
#   DRY_RUN=1                print the torchrun command instead of running it
# A single-node run lets torchrun pick a free port (--standalone), so two jobs on one machine do not collide.
set -euo pipefail

die() { echo "train.sh: $*" >&2; exit 2; }

[ $# -ge 3 ] || die "usage: bash train.sh GPUS NPROC SCRIPT [ARGS...]  (e.g. bash train.sh 0,1 2 train_dino.py, or bash train.sh cpu 2 train_dino.py)"
GPUS=$1; NPROC=$2; SCRIPT=$3; shift 3

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi

[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive integer, got '$NPROC'"
[ -f "$SCRIPT" ] || die "script not found: $SCRIPT"

if [ "$GPUS" = "cpu" ]; then
  # Hide GPUs so device "auto" resolves to the CPU and the gloo backend is used.
  export CUDA_VISIBLE_DEVICES=""
  if [ -z "${OMP_NUM_THREADS:-}" ]; then
    cores=$(nproc 2>/dev/null || echo 1)
    threads=$(( cores / NPROC )); [ "$threads" -ge 1 ] || threads=1
    export OMP_NUM_THREADS=$threads
  fi
elif [[ "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  IFS=, read -r -a ids <<< "$GPUS"
  [ "$NPROC" -le "${#ids[@]}" ] || die "NPROC=$NPROC is larger than the ${#ids[@]} GPU id(s) given in '$GPUS'"
  export CUDA_VISIBLE_DEVICES=$GPUS
  have=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null) \
    || die "cannot import torch with $PYTHON; run 'make demo' once to create .venv, or set PYTHON"
  [ "$have" -gt 0 ] || die "GPUs '$GPUS' asked for but CUDA is not available here; use 'cpu' instead (bash train.sh cpu $NPROC $SCRIPT ...)"
  [ "$have" -ge "$NPROC" ] || die "NPROC=$NPROC but only $have of the GPUs '$GPUS' are visible"
else
  die "GPUS must be comma-separated GPU ids like 0,1,2,3 or 'cpu', got '$GPUS'"
fi

NNODES=${NNODES:-1}
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$NNODES'"
args=(--nproc_per_node "$NPROC" --max_restarts "${MAX_RESTARTS:-0}")
if [ "$NNODES" -gt 1 ]; then
  [ -n "${MASTER_ADDR:-}" ] || die "NNODES=$NNODES needs MASTER_ADDR (the address of node 0)"
  NODE_RANK=${NODE_RANK:-0}
  [[ "$NODE_RANK" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] || die "NODE_RANK must be in 0..$((NNODES - 1)), got '$NODE_RANK'"
  args+=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
else
  args+=(--standalone --nnodes 1)
fi

# The package is importable from any script without installing it.
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
cmd=("$PYTHON" -m torch.distributed.run "${args[@]}" "$SCRIPT" "$@")
if [ -n "${DRY_RUN:-}" ]; then echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES ${cmd[*]}"; exit 0; fi
exec "${cmd[@]}"
