"""The Slurm side of `diffmic train` and `diffmic eval` (--slurm, --local, --dry-run)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from .common import UserError, console

SLURM = typer.Option(False, "--slurm", help="Submit to Slurm through submitit instead of running here.",
                     rich_help_panel="Slurm")
LOCAL = typer.Option(False, "--local", help="Run the Slurm job's tasks here with submitit's local executor.",
                     rich_help_panel="Slurm")
GPUS = typer.Option(8, "--gpus", help="GPUs per node, one task each; 0 for CPU tasks.", rich_help_panel="Slurm")
NODES = typer.Option(1, "--nodes", help="Nodes.", rich_help_panel="Slurm")
TASKS = typer.Option(0, "--tasks-per-node", help="Processes per node when --gpus 0.", rich_help_panel="Slurm")
PARTITION = typer.Option("", "--partition", help="Slurm partition (default: the cluster's).", rich_help_panel="Slurm")
TIME = typer.Option("24:00:00", "--time", help="Time limit, [D-]HH:MM:SS.", rich_help_panel="Slurm")
CPUS = typer.Option(0, "--cpus-per-task", help="CPUs per task (default 8 per GPU task, 1 per CPU task).",
                    rich_help_panel="Slurm")
MEM = typer.Option(0, "--mem", help="Memory per node in GB (default: the partition's).", rich_help_panel="Slurm")
ACCOUNT = typer.Option("", "--account", help="Slurm account.", rich_help_panel="Slurm")
QOS = typer.Option("", "--qos", help="Quality of service.", rich_help_panel="Slurm")
CONSTRAINT = typer.Option("", "--constraint", help="Node features, e.g. a100.", rich_help_panel="Slurm")
EXCLUDE = typer.Option("", "--exclude", help="Nodes to avoid.", rich_help_panel="Slurm")
REQUEUES = typer.Option(3, "--max-requeues", help="Requeues after preemption or time-out before giving up.",
                        rich_help_panel="Slurm")
DRY_RUN = typer.Option(False, "--dry-run", help="Print the resources and the sbatch script; submit nothing.",
                       rich_help_panel="Slurm")
WAIT = typer.Option(False, "--wait", help="Wait for the job and exit non-zero if it fails.", rich_help_panel="Slurm")


def slurm_options(gpus, nodes, tasks_per_node, partition, time_limit, cpus_per_task, mem, account, qos, constraint,
                  exclude, max_requeues, local):
    from ..launch.slurm import SlurmOptions

    if gpus < 0 or nodes < 1 or tasks_per_node < 0 or max_requeues < 0:
        raise UserError("--gpus, --tasks-per-node and --max-requeues must be >= 0 and --nodes >= 1")
    if gpus == 0 and tasks_per_node == 0:
        raise UserError("--gpus 0 runs CPU tasks: say how many with --tasks-per-node N")
    return SlurmOptions(gpus=gpus, nodes=nodes, tasks_per_node=tasks_per_node, partition=partition, time=time_limit,
                        cpus_per_task=cpus_per_task, mem_gb=mem, account=account, qos=qos, constraint=constraint,
                        exclude=exclude, max_requeues=max_requeues, local=local)


def launch(kind: str, arguments: dict, run_dir: Path, options, dry_run: bool, wait: bool) -> None:
    """Submits (or, with --dry-run, describes) one job and tells the user how to follow it."""
    from ..launch.slurm import DistributedJob, sbatch_script, submit

    name = f"diffmic-{kind}-{run_dir.name}"
    if dry_run:
        console.print(f"[bold]{kind} job[/] {name}: {options.nodes} node(s) x {options.tasks()} task(s), "
                      f"{options.gpus} GPU(s) per node, time {options.time}, run folder {run_dir}", highlight=False)
        console.print(sbatch_script(options, run_dir / "slurm", name), highlight=False, markup=False)
        console.print("dry run: nothing was submitted")
        return
    job = DistributedJob(kind, arguments, str(run_dir), options.max_requeues)
    submitted, record = submit(job, options, run_dir, name)
    console.print(f"submitted {kind} job {record['job_id']}; logs in {record['log_dir']}\n"
                  f"follow it with: diffmic status {run_dir}   (or tail -f {record['log_dir']}/*_0_log.out)",
                  highlight=False)
    if wait:
        if options.local:
            submitted.wait()  # the local tasks are this process's children: wait on them directly
        wait_for(record, run_dir)


def wait_for(record: dict, run_dir: Path, poll: float = 5.0) -> None:
    from ..launch.slurm import FINISHED_OK, UNFINISHED, job_state

    while (state := job_state(record)) in UNFINISHED:
        time.sleep(poll)
    if state not in FINISHED_OK:
        raise UserError(f"job {record['job_id']} ended {state}; see its logs in {record['log_dir']} "
                        f"(diffmic status {run_dir})")
    console.print(f"job {record['job_id']} {state}", highlight=False)
