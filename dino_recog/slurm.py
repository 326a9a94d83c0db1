"""SLURM's description of a job, as what torch.distributed and train.sh expect (no torch: train.sh runs it).

    python -m dino_recog.slurm train-sh      # inside `srun`: NNODES=.. NODE_RANK=.. MASTER_ADDR=.. MASTER_PORT=..

Two ways to run on a SLURM allocation, both mapped here from SLURM's variables:
- one process per task (`python -m dino_recog.submit`, or `srun --ntasks-per-node=G python train_dino.py`):
  RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID, WORLD_SIZE = SLURM_NTASKS, LOCAL_WORLD_SIZE = the tasks of
  this node (:func:`torch_env`);
- one `train.sh` per node (`srun --ntasks-per-node=1 bash train.sh 0,1,2,3 4 train_dino.py`), torchrun starting the
  node's processes: NNODES = the step's nodes, NODE_RANK = this node's place among them (:func:`train_sh_env`).
Either way MASTER_ADDR is the first host of the node list and MASTER_PORT a port derived from the job id (so two
jobs sharing a node do not collide), unless MASTER_PORT is set already.
"""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Mapping

__all__ = ["SlurmError", "expand_nodelist", "master_port", "tasks_per_node", "torch_env", "train_sh_env"]


class SlurmError(ValueError):
    """A SLURM environment this toolkit cannot run in as it is (the message says how to start it instead)."""


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list as host names: `node[03-05,07],gpu1` -> node03 node04 node05 node07 gpu1.

    Zero-padded ranges keep their width; a name may hold several bracket groups (`r[1-2]n[1-2]`: every combination,
    as `scontrol show hostnames` gives them).
    """
    hosts = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        parts = re.split(r"\[([^\]]*)\]", item)  # literal, group, literal, group, ..., literal
        choices = [[parts[0]]]
        for group, literal in zip(parts[1::2], parts[2::2]):
            choices += [_expand_group(group, nodelist), [literal]]
        hosts += ["".join(c) for c in itertools.product(*choices)]
    if not hosts:
        raise SlurmError(f"SLURM node list {nodelist!r}: no host in it")
    return hosts


def _expand_group(group: str, nodelist: str) -> list[str]:
    out = []
    for part in group.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise SlurmError(f"SLURM node list {nodelist!r}: cannot read {part!r} (expected N or N-M with M >= N)")
        first, last = m.group(1), m.group(2) or m.group(1)
        out += [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
    return out


def tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE / SLURM_STEP_TASKS_PER_NODE (`4(x2),3`) as one count per node: [4, 4, 3]."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise SlurmError(f"SLURM tasks per node {spec!r}: cannot read {part!r} (expected N or N(xM))")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def master_port(environ: Mapping[str, str]) -> str:
    """MASTER_PORT if set, else a port from the job id in 20000-29999 (below Linux's ephemeral ports)."""
    return environ.get("MASTER_PORT") or str(20000 + int(_get(environ, "SLURM_JOB_ID")) % 10000)


def torch_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed environment (env:// rendezvous) of one task of a SLURM job step."""
    nodes = expand_nodelist(environ.get("SLURM_STEP_NODELIST") or _get(environ, "SLURM_JOB_NODELIST"))
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    node = int(_get(environ, "SLURM_NODEID"))
    local_world = tasks_per_node(per_node)[node] if per_node else int(_get(environ, "SLURM_NTASKS")) // len(nodes)
    return {
        "RANK": _get(environ, "SLURM_PROCID"),
        "LOCAL_RANK": _get(environ, "SLURM_LOCALID"),
        "WORLD_SIZE": _get(environ, "SLURM_NTASKS"),
        "LOCAL_WORLD_SIZE": str(local_world),
        "MASTER_ADDR": nodes[0],
        "MASTER_PORT": master_port(environ),
    }


def train_sh_env(environ: Mapping[str, str]) -> dict[str, str]:
    """NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT for train.sh inside a SLURM allocation; {} where there is
    nothing to fill (no SLURM, or one node: torchrun's --standalone)."""
    if "SLURM_JOB_ID" not in environ:
        return {}
    if "SLURM_STEP_ID" not in environ:  # the allocation's shell (salloc) or batch script (sbatch): this node only
        nodes = int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
        if nodes > 1:
            raise SlurmError(
                f"this SLURM allocation has {nodes} nodes but train.sh runs on one: start it on every node with "
                "srun --ntasks-per-node=1 bash train.sh GPUS NPROC SCRIPT ..."
            )
        return {}
    hosts = expand_nodelist(_get(environ, "SLURM_STEP_NODELIST"))
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS") or len(hosts))
    if tasks != len(hosts):
        raise SlurmError(
            f"srun started {tasks} tasks on {len(hosts)} node(s), but train.sh starts the processes of its node "
            "itself (NPROC): use srun --ntasks-per-node=1 bash train.sh GPUS NPROC SCRIPT ..."
        )
    if len(hosts) == 1:
        return {}
    here = environ.get("SLURMD_NODENAME")
    node_rank = hosts.index(here) if here in hosts else int(_get(environ, "SLURM_NODEID"))
    return {"NNODES": str(len(hosts)), "NODE_RANK": str(node_rank), "MASTER_ADDR": hosts[0],
            "MASTER_PORT": master_port(environ)}  # fmt: skip


def _get(environ: Mapping[str, str], name: str) -> str:
    if not environ.get(name):
        raise SlurmError(f"{name} is not set: not inside a SLURM job step")
    return environ[name]


def main(argv: list[str] | None = None) -> int:
    import os

    argv = sys.argv[1:] if argv is None else argv
    if argv != ["train-sh"]:
        print("usage: python -m dino_recog.slurm train-sh", file=sys.stderr)
        return 2
    try:
        env = train_sh_env(os.environ)
    except SlurmError as e:
        print(e)  # on stdout, which train.sh reads (its stderr may carry unrelated warnings)
        return 2
    print("\n".join(f"{k}={v}" for k, v in env.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
