"""Submit a training script to SLURM with submitit: one process per GPU, on as many nodes as asked.

    python -m dino_recog.submit --nodes 2 --gpus-per-node 8 --partition gpu --time 72:00:00 \\
        train_dino.py [--config configs/luperson/dino_vit_small.yaml] [key=value ...]
    python -m dino_recog.submit --local --gpus-per-node 0 --tasks-per-node 2 --wait train_dino.py ...  # this machine

The config and the paths it names are checked here first, as `train.sh` does (`dino_recog.preflight`): a mistake
is one line before anything is queued. submitit writes the job's scripts and each task's log to
`RUN_DIR/slurm/JOBID_TASK_log.{out,err}` (RUN_DIR: the config's `run.output_dir`, where the run writes its
`config.yaml`, checkpoints and logs). Each task maps SLURM's variables to torch.distributed's (`dino_recog.slurm`)
and runs the script as `python SCRIPT ARGS` would, from the folder the job was submitted from. When SLURM pre-empts
the job or its time runs out, submitit's checkpointing hook requeues the same command with `run.resume=auto`, so it
continues from the newest checkpoint of RUN_DIR (set `run.save_every_steps` so that little is lost).
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import sys
from pathlib import Path

from . import preflight
from .user_errors import positive_int

__all__ = ["Task", "main", "minutes"]

ROOT = Path(__file__).resolve().parents[1]


class Task:
    """One task of the job: `python SCRIPT ARGV` under torch.distributed's variables, and how to requeue it."""

    def __init__(self, script: str, argv: list[str], cwd: str) -> None:
        self.script, self.argv, self.cwd = script, list(argv), cwd

    def __call__(self) -> None:
        os.environ.update(task_env())
        os.chdir(self.cwd)
        sys.argv = [self.script, *self.argv]
        runpy.run_path(self.script, run_name="__main__")

    def checkpoint(self, *args, **kwargs):
        """submitit calls this when SLURM pre-empts the job or its time is up: the same command, resumed."""
        from submitit.helpers import DelayedSubmission

        argv = [a for a in self.argv if not a.startswith("run.resume=")] + ["run.resume=auto"]
        return DelayedSubmission(Task(self.script, argv, self.cwd))


def task_env() -> dict[str, str]:
    """torch.distributed's variables for this task: from SLURM's (a SLURM job) or submitit's (the local executor)."""
    from . import slurm

    if "SLURM_PROCID" in os.environ:
        return slurm.torch_env(os.environ)
    import submitit

    job = submitit.JobEnvironment()
    return {
        "RANK": str(job.global_rank), "LOCAL_RANK": str(job.local_rank), "WORLD_SIZE": str(job.num_tasks),
        "LOCAL_WORLD_SIZE": str(job.num_tasks // job.num_nodes), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(20000 + int(re.sub(r"\D", "", job.job_id)) % 10000),
    }  # fmt: skip


def minutes(text: str) -> int:
    """SLURM's time limit forms (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) as whole minutes, rounded up."""
    days, _, rest = text.rpartition("-") if "-" in text else ("0", "", text)
    parts = rest.split(":")
    if not (days.isdigit() and 1 <= len(parts) <= 3 and all(x.isdigit() for x in parts)):
        raise argparse.ArgumentTypeError(f"{text}: expected a SLURM time limit such as 72:00:00 or 3-00:00:00")
    values = [int(x) for x in parts]
    if "-" in text:  # D-HH[:MM[:SS]]
        seconds = (values + [0, 0])[:3]
        total = int(days) * 86400 + seconds[0] * 3600 + seconds[1] * 60 + seconds[2]
    else:  # MM, MM:SS, HH:MM:SS
        total = {1: lambda m: m * 60, 2: lambda m, s: m * 60 + s, 3: lambda h, m, s: h * 3600 + m * 60 + s}[
            len(values)](*values)
    if total <= 0:
        raise argparse.ArgumentTypeError(f"{text}: expected a time limit > 0")
    return -(-total // 60)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dino_recog.submit", description=__doc__.split("\n\n")[0],
        usage="%(prog)s [options] SCRIPT [--config PATH] [key=value ...]",
    )  # fmt: skip
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (0: CPU processes, gloo)")
    p.add_argument("--tasks-per-node", type=positive_int, help="processes per node (default: one per GPU, or 1)")
    p.add_argument("--cpus-per-task", type=positive_int, default=10, help="CPU cores per process (data loading)")
    p.add_argument("--mem-gb", type=positive_int, help="memory per node")
    p.add_argument("--time", type=minutes, default=minutes("72:00:00"), help="time limit (72:00:00)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--constraint", help="SLURM constraint (e.g. a GPU type)")
    p.add_argument("--qos", help="SLURM quality of service")
    p.add_argument("--job-name", help="default: the script's name and the run directory")
    p.add_argument("--local", action="store_true", help="submitit's local executor: the tasks run on this machine")
    p.add_argument("--wait", action="store_true", help="wait for the job and exit with its status")
    p.add_argument("script", help="train_dino.py or train_recog.py")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    problem = preflight.check(args.script, args.args)
    if problem is None and not Path(args.script).is_file():
        problem = f"{args.script}: script not found"
    cfg = preflight.load(args.script, args.args) if problem is None else None
    if problem is None and cfg is None:
        problem = f"{args.script}: expected train_dino.py or train_recog.py"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    import submitit

    run_dir = Path(cfg.run.output_dir).resolve()
    folder = run_dir / "slurm"
    tasks = args.tasks_per_node or max(1, args.gpus_per_node)
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="local" if args.local else "slurm")
    except Exception as e:  # submitit: no sbatch on this machine
        print(f"error: cannot submit to SLURM here ({e}); run it on a SLURM login node, or --local", file=sys.stderr)
        return 2
    path = f"{ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"  # the tasks import dino_recog wherever they start
    executor.update_parameters(
        name=args.job_name or f"{Path(args.script).stem}:{run_dir.name}", nodes=args.nodes,
        tasks_per_node=tasks, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
        timeout_min=args.time, mem_gb=args.mem_gb, slurm_partition=args.partition, slurm_account=args.account,
        slurm_constraint=args.constraint, slurm_qos=args.qos, slurm_signal_delay_s=120,
        slurm_setup=[f"export PYTHONPATH={path}"], local_setup=[f"export PYTHONPATH={path}"],
    )  # fmt: skip
    job = executor.submit(Task(os.path.abspath(args.script), args.args, os.getcwd()))
    print(f"submitted job {job.job_id}: {args.nodes} node(s) x {tasks} task(s), run directory {run_dir}, "
          f"logs {folder}/{job.job_id}_*_log.out")  # fmt: skip
    if not args.wait:
        return 0
    try:
        job.results()
    except Exception as e:  # submitit re-raises a task's failure with its log's tail
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"error: job {job.job_id} failed: {last} (logs: {folder}/{job.job_id}_*_log.err)", file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
