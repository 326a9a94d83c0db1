"""SLURM's variables as torch.distributed's and train.sh's, on variable sets recorded from real job steps."""

import pytest
from conftest import train_sh

from dino_recog.slurm import SlurmError, expand_nodelist, tasks_per_node, torch_env, train_sh_env

# `srun --nodes 4 --ntasks-per-node 2 env` on nodes node03-05 and node07, task 5 (node05's second); trimmed to the
# variables the mapping reads, plus a few it must not be confused by.
SBATCH_4x2_TASK5 = {
    "SLURM_JOB_ID": "4123", "SLURM_JOB_NODELIST": "node[03-05,07]", "SLURM_JOB_NUM_NODES": "4", "SLURM_NNODES": "4",
    "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "node[03-05,07]", "SLURM_STEP_NUM_NODES": "4",
    "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "2(x4)", "SLURM_TASKS_PER_NODE": "2(x4)",
    "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "2", "SLURMD_NODENAME": "node05",
    "SLURM_GTIDS": "4,5", "SLURM_CPUS_ON_NODE": "32",
}  # fmt: skip


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node[03-05,07]", ["node03", "node04", "node05", "node07"]),
        ("gpu1", ["gpu1"]),
        ("a[8-10],b01,c[1,3]", ["a8", "a9", "a10", "b01", "c1", "c3"]),
        ("r[1-2]n[09-10]", ["r1n09", "r1n10", "r2n09", "r2n10"]),
        ("x-[001-002].cluster", ["x-001.cluster", "x-002.cluster"]),
    ],
)
def test_expand_nodelist_like_scontrol_show_hostnames(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_unreadable_lists_are_refused_naming_them():
    with pytest.raises(SlurmError, match=r"SLURM node list 'n\[5-3\]': cannot read '5-3' \(expected N or N-M"):
        expand_nodelist("n[5-3]")
    with pytest.raises(SlurmError, match=r"cannot read 'x' \(expected N or N\(xM\)\)"):
        tasks_per_node("2(x3),x")
    assert tasks_per_node("4(x2),3") == [4, 4, 3]


def test_one_process_per_task_gets_its_rank_and_the_first_host():
    assert torch_env(SBATCH_4x2_TASK5) == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node03", "MASTER_PORT": "24123",
    }  # fmt: skip
    uneven = {**SBATCH_4x2_TASK5, "SLURM_STEP_TASKS_PER_NODE": "3,2(x2),1", "SLURM_NODEID": "3"}
    assert torch_env(uneven)["LOCAL_WORLD_SIZE"] == "1"
    assert torch_env({**SBATCH_4x2_TASK5, "MASTER_PORT": "29511"})["MASTER_PORT"] == "29511"
    with pytest.raises(SlurmError, match="^SLURM_PROCID is not set: not inside a SLURM job step$"):
        torch_env({k: v for k, v in SBATCH_4x2_TASK5.items() if k != "SLURM_PROCID"})


def test_train_sh_per_node_gets_the_node_count_and_its_rank():
    per_node = {**SBATCH_4x2_TASK5, "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "1(x4)"}
    assert train_sh_env(per_node) == {"NNODES": "4", "NODE_RANK": "2", "MASTER_ADDR": "node03", "MASTER_PORT": "24123"}
    assert train_sh_env({}) == {}  # not under SLURM
    one_node = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu1", "SLURM_STEP_NUM_TASKS": "1"}
    assert train_sh_env(one_node) == {}  # torchrun --standalone
    assert train_sh_env({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1"}) == {}  # salloc on one node
    with pytest.raises(SlurmError, match=r"^this SLURM allocation has 4 nodes but train.sh runs on one: start it on "
                                         r"every node with srun --ntasks-per-node=1 bash train.sh"):  # fmt: skip
        train_sh_env({k: v for k, v in SBATCH_4x2_TASK5.items() if not k.startswith("SLURM_STEP")})
    with pytest.raises(SlurmError, match=r"^srun started 8 tasks on 4 node\(s\), but train.sh starts the processes"):
        train_sh_env(SBATCH_4x2_TASK5)


def test_train_sh_fills_the_multi_node_launch_from_slurm():
    per_node = {**SBATCH_4x2_TASK5, "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "1(x4)"}
    r = train_sh("cpu", 2, "train_dino.py", DRY_RUN="1", **per_node)
    assert r.returncode == 0, r.stderr
    assert "--nnodes 4 --node_rank 2 --master_addr node03 --master_port 24123 train_dino.py" in r.stdout
    r = train_sh("cpu", 2, "train_dino.py", DRY_RUN="1", **SBATCH_4x2_TASK5)
    assert r.returncode == 2 and r.stderr.startswith("train.sh: srun started 8 tasks on 4 node(s)")
    r = train_sh("cpu", 2, "train_dino.py", DRY_RUN="1", NNODES="1", **SBATCH_4x2_TASK5)  # the user's NNODES wins
    assert r.returncode == 0 and "--standalone" in r.stdout
