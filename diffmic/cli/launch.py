"""The launch options of `diffmic train` and `diffmic eval` (--slurm, --local, the job's resources, --dry-run,
--wait), declared once: `with_launch_options` adds them to a command, which receives them as one `Launch`.

`--gpus N` means N processes everywhere: a Slurm job's per node with --slurm, N local processes without
(`--gpus 0 --tasks-per-node N`: N CPU processes)."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from pathlib import Path

import typer

from ..launch.job import Job, to_json
from ..launch.slurm import FINISHED_OK, UNFINISHED, DistributedJob, SlurmOptions, job_state, sbatch_script, submit
from ..run import RunFolder
from .common import UserError, console, field_options, with_options

PANEL = "Slurm"


def _option(name: str, annotation: type, default, flag: str, help: str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, flag, help=help, rich_help_panel=PANEL))


LAUNCH_OPTIONS = [
    _option("slurm", bool, False, "--slurm", "Submit to Slurm through submitit instead of running here."),
    *field_options(SlurmOptions, PANEL),
    _option("dry_run", bool, False, "--dry-run", "Print the resources and the sbatch script; submit nothing."),
    _option("wait", bool, False, "--wait", "Wait for the job and exit non-zero if it fails."),
]


@dataclass(frozen=True)
class Launch:
    """How a command runs its job: as one submitit job with these resources (`slurm`), or here in `processes`
    local processes (on the CPU when `cpu`); one process here is the plain call."""

    slurm: SlurmOptions | None
    dry_run: bool
    wait: bool
    processes: int = 1
    cpu: bool = False

    @classmethod
    def from_flags(cls, slurm: bool, dry_run: bool, wait: bool, **resources) -> "Launch":
        if slurm or resources["local"]:
            return cls(SlurmOptions(**resources), dry_run, wait)
        return cls(None, dry_run, wait, *local_processes(resources))

    @property
    def elsewhere(self) -> bool:
        """The command's work runs in other processes (a job, or several local ones), not in this one."""
        return self.slurm is not None or self.processes > 1

    def run(self, job: Job, progress: bool = True) -> None:
        """Runs the job here, or in the local processes (returning when they end), or submits it."""
        if not self.elsewhere:
            job.run(progress)
            return
        job = job.absolute()  # the processes may start in another folder, or on another machine
        if self.slurm is not None:
            self.submit(job, Path(job.run_dir))
            return
        from ..launch.local import launch_processes

        launch_processes(job, self.processes, self.cpu, progress,
                         report=lambda line: console.print(line, highlight=False))

    def submit(self, job: Job, run_dir: Path) -> None:
        """Submits (or, with --dry-run, describes) the job and tells the user how to follow it."""
        options, name = self.slurm, f"diffmic-{job.kind}-{run_dir.name}"
        if self.dry_run:
            console.print(f"[bold]{job.kind} job[/] {name}: {options.nodes} node(s) x {options.tasks()} task(s), "
                          f"{options.gpus} GPU(s) per node, time {options.time}, run folder {run_dir}",
                          highlight=False)
            console.print(sbatch_script(options, RunFolder(run_dir).slurm_logs, name), highlight=False, markup=False)
            console.print("dry run: nothing was submitted")
            return
        submitted, record = submit(DistributedJob(to_json(job), options.max_requeues), options, run_dir, name)
        console.print(f"submitted {job.kind} job {record['job_id']}; logs in {record['log_dir']}\n"
                      f"follow it with: diffmic status {run_dir}   (or tail -f {record['log_dir']}/*_0_log.out)",
                      highlight=False)
        if self.wait:
            if options.local:
                submitted.wait()  # the local tasks are this process's children: wait on them directly
            wait_for(record, run_dir)


def local_processes(resources: dict) -> tuple[int, bool]:
    """(processes, on the CPU) of a command run here: --gpus N, or --gpus 0 --tasks-per-node N."""
    gpus, tasks, nodes = resources["gpus"], resources["tasks_per_node"], resources["nodes"]
    if nodes != 1:
        raise UserError(f"--nodes {nodes} needs --slurm: here every process runs on this machine")
    if gpus is None:
        if tasks:
            raise UserError(f"--tasks-per-node {tasks} without --slurm runs CPU processes: add --gpus 0")
        return 1, False
    if gpus == 0:
        if tasks < 1:
            raise UserError("--gpus 0 runs CPU processes here: say how many with --tasks-per-node N")
        return tasks, True
    return gpus, False


# Adds LAUNCH_OPTIONS to a Typer command (after its own options); the command receives them as one
# `launch: Launch` argument.
with_launch_options = with_options("launch", LAUNCH_OPTIONS, Launch.from_flags)


def wait_for(record: dict, run_dir: Path, poll: float = 5.0) -> None:
    while (state := job_state(record)) in UNFINISHED:
        time.sleep(poll)
    if state not in FINISHED_OK:
        raise UserError(f"job {record['job_id']} ended {state}; see its logs in {record['log_dir']} "
                        f"(diffmic status {run_dir})")
    console.print(f"job {record['job_id']} {state}", highlight=False)
