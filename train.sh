#!/usr/bin/env bash
# Launch a dino_recog script with torchrun.
#
#   bash train.sh GPUS NPROC SCRIPT [ARGS...]
#
#   bash train.sh 0,1,2,3 4 train_dino.py                    # 4 GPUs on this machine (nccl)
#   bash train.sh 0,1,2,3 4 train_recog.py --config configs/market1501/vit_small.yaml train.epochs=60
#   bash train.sh cpu 2 train_dino.py --config configs/demo/dino.yaml   # 2 CPU processes (gloo)
#   bash train.sh 0,1,2,3 4 train_usl.py --config configs/market1501/usl_vit_small_transreid_ssl.yaml
#
# GPUS   comma-separated GPU ids (exported as CUDA_VISIBLE_DEVICES), or "cpu".
# NPROC  processes on this node; at most the number of GPU ids given.
# SCRIPT a Python script; ARGS are passed to it unchanged.
#
# Environment (all optional):
#   NNODES, NODE_RANK        multi-node: number of nodes and this node's index (0 on the master node); inside a SLURM
#                            job step (srun --ntasks-per-node=1 bash train.sh ...) filled from SLURM's variables, with
#                            MASTER_ADDR (the first node) and MASTER_PORT (from the job id)
#   MASTER_ADDR, MASTER_PORT multi-node: address and port of node 0 (MASTER_ADDR required when NNODES > 1; port
#                            default 29500, checked to be free on node 0 before torchrun starts)
#   MAX_RESTARTS             torchrun elastic restarts of the whole worker group after a worker fails (default 0):
#                            torchrun stops the other workers and starts them all again, and with `run.resume: auto`
#                            (the default) they continue from the last checkpoint; set run.save_every_steps so that a
#                            failure costs minutes rather than an epoch
#   PYTHON                   interpreter to use (default: .venv/bin/python next to this file, else python3)
#   DRY_RUN=1                print the torchrun command instead of running it
# A single-node run lets torchrun pick a free port (--standalone), so two jobs on one machine do not collide;
# MASTER_PORT is then not used.
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
  dup=$(printf '%s\n' "${ids[@]}" | sort | uniq -d | head -n 1)
  [ -z "$dup" ] || die "GPU id $dup is given twice in '$GPUS'; each process needs a GPU of its own"
  # Count the GPUs of this machine (the ids are exported as CUDA_VISIBLE_DEVICES, replacing the caller's), then
  # check every id: CUDA silently drops an id that does not exist, and every id after it.
  have=$(env -u CUDA_VISIBLE_DEVICES "$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null) \
    || die "cannot import torch with $PYTHON; run 'make demo' once to create .venv, or set PYTHON"
  [ "$have" -gt 0 ] || die "GPUs '$GPUS' asked for but CUDA is not available here; use 'cpu' instead (bash train.sh cpu $NPROC $SCRIPT ...)"
  for id in "${ids[@]}"; do
    [ "$id" -lt "$have" ] || die "GPU id $id does not exist: this machine has $have GPU(s), ids 0 to $((have - 1))"
  done
  export CUDA_VISIBLE_DEVICES=$GPUS
else
  die "GPUS must be comma-separated GPU ids like 0,1,2,3 or 'cpu', got '$GPUS'"
fi

# Inside a SLURM allocation (srun --ntasks-per-node=1 bash train.sh ...: one train.sh per node), the nodes, this
# node's rank and the rendezvous host come from SLURM's variables unless NNODES is set (dino_recog/slurm.py).
if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${NNODES:-}" ]; then
  slurm_env=$(PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m dino_recog.slurm train-sh) || die "$slurm_env"
  while IFS='=' read -r key value; do
    [ -z "$key" ] || export "$key=$value"
  done <<< "$slurm_env"
fi

MAX_RESTARTS=${MAX_RESTARTS:-0}
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be a non-negative integer, got '$MAX_RESTARTS'"

NNODES=${NNODES:-1}
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$NNODES'"
args=(--nproc_per_node "$NPROC" --max_restarts "$MAX_RESTARTS")
if [ "$NNODES" -gt 1 ]; then
  [ -n "${MASTER_ADDR:-}" ] || die "NNODES=$NNODES needs MASTER_ADDR (the address of node 0)"
  NODE_RANK=${NODE_RANK:-0}
  [[ "$NODE_RANK" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] || die "NODE_RANK must be in 0..$((NNODES - 1)), got '$NODE_RANK'"
  MASTER_PORT=${MASTER_PORT:-29500}
  [[ "$MASTER_PORT" =~ ^[0-9]+$ ]] && [ "$MASTER_PORT" -ge 1 ] && [ "$MASTER_PORT" -le 65535 ] \
    || die "MASTER_PORT must be a port number 1..65535, got '$MASTER_PORT'"
  if [ "$NODE_RANK" -eq 0 ]; then
    # Node 0 hosts the rendezvous on MASTER_PORT; a port in use would otherwise fail deep inside torchrun.
    rc=0
    "$PYTHON" -c 'import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("", int(sys.argv[1])))
except OSError:
    sys.exit(3)' "$MASTER_PORT" 2>/dev/null || rc=$?
    [ "$rc" -ne 3 ] || die "MASTER_PORT=$MASTER_PORT is already in use on this machine (node 0 hosts the rendezvous there); choose a free port, e.g. MASTER_PORT=$((MASTER_PORT + 1))"
    [ "$rc" -eq 0 ] || die "cannot run $PYTHON to check MASTER_PORT; set PYTHON to the environment's python"
  fi
  args+=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
else
  args+=(--standalone --nnodes 1)
fi

# The package is importable from any script without installing it.
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
# dino_recog.launch is torchrun (torch.distributed.run, same options) ending a failed run with the failed worker's
# own one-line error rather than torchrun's report of the failed processes.
cmd=("$PYTHON" -m dino_recog.launch "${args[@]}" "$SCRIPT" "$@")
if [ -n "${DRY_RUN:-}" ]; then echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES ${cmd[*]}"; exit 0; fi
# The config and the paths it names, checked once here (no torch: well under a second) rather than by every worker,
# whose messages torchrun would bury under its report of the failed workers.
"$PYTHON" -m dino_recog.preflight "$SCRIPT" "$@" || exit 2
exec "${cmd[@]}"
