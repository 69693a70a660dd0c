"""Slurm jobs through submitit: the same training and evaluation functions as a local run, one task
per GPU (or N CPU tasks), preemption handled by saving, requeueing and resuming.

The submitted callable (`DistributedJob`) lives in the installed package, so a job needs nothing but
the environment that submitted it. Inside each task it exports the torch.distributed variables from
submitit's job environment, then runs the job (diffmic.launch.job) the command resolved.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..config import flag
from ..errors import SlurmError
from ..fileio import read_json_object, write_json_atomic
from ..run import RunFolder
from ..run.lock import pid_alive

UNFINISHED = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
              "RESIZING", "SUSPENDED", "UNKNOWN", "READY"}
FINISHED_OK = {"COMPLETED", "DONE"}


DEFAULT_JOB_GPUS = 8  # a Slurm job's GPUs per node when --gpus is not given

# Preemption sends SIGUSR2 this long before the kill: time to finish the step, save and requeue.
SIGNAL_DELAY_S = 120


@dataclass
class SlurmOptions:
    """The resources of one Slurm (or submitit-local) job; every field is a flag of `diffmic train` and `eval`,
    in this order in their help, and checked here alone."""

    local: bool = flag(False, "--local", "Run the Slurm job's tasks here with submitit's local executor.")
    gpus: int | None = flag(None, "--gpus", "GPUs per node, one process each (default 8 under --slurm; without "
                                           "--slurm, N local processes); 0 for CPU processes (--tasks-per-node N).")
    nodes: int = flag(1, "--nodes", "Nodes.")
    tasks_per_node: int = flag(0, "--tasks-per-node", "Processes per node when --gpus 0 (also without --slurm).")
    partition: str = flag("", "--partition", "Slurm partition (default: the cluster's).")
    time: str = flag("24:00:00", "--time", "Time limit, [D-]HH:MM:SS.")
    cpus_per_task: int = flag(0, "--cpus-per-task", "CPUs per task (default 8 per GPU task, 1 per CPU task).")
    mem_gb: int = flag(0, "--mem", "Memory per node in GB (default: the partition's).")
    account: str = flag("", "--account", "Slurm account.")
    qos: str = flag("", "--qos", "Quality of service.")
    constraint: str = flag("", "--constraint", "Node features, e.g. a100.")
    exclude: str = flag("", "--exclude", "Nodes to avoid.")
    max_requeues: int = flag(3, "--max-requeues", "Requeues after preemption or time-out before giving up.")

    def __post_init__(self):
        if self.gpus is None:
            self.gpus = DEFAULT_JOB_GPUS
        if not re.fullmatch(r"\d+(-\d+(:\d+){0,2}|(:\d+){0,2})", self.time):
            raise SlurmError(f"--time {self.time!r} is not a Slurm time; use MM, HH:MM:SS or D-HH:MM:SS "
                             f"(e.g. --time 24:00:00)")
        if self.gpus < 0 or self.nodes < 1 or self.tasks_per_node < 0 or self.max_requeues < 0:
            raise SlurmError("--gpus, --tasks-per-node and --max-requeues must be >= 0 and --nodes >= 1")
        if self.gpus == 0 and self.tasks_per_node == 0:
            raise SlurmError("--gpus 0 runs CPU tasks: say how many with --tasks-per-node N")

    def tasks(self) -> int:
        return self.gpus if self.gpus > 0 else self.tasks_per_node

    def minutes(self) -> int:
        """Slurm's --time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (seconds round up)."""
        days, hours, minutes, seconds = 0, 0, 0, 0
        if "-" in self.time:
            day_text, rest = self.time.split("-", 1)
            days = int(day_text)
            hours, minutes, seconds = ([int(p) for p in rest.split(":")] + [0, 0])[:3]
        else:
            parts = [int(p) for p in self.time.split(":")]
            if len(parts) == 3:
                hours, minutes, seconds = parts
            else:
                minutes, seconds = (parts + [0])[:2]
        return max(1, days * 1440 + hours * 60 + minutes + (1 if seconds else 0))


@dataclass
class DistributedJob:
    """What runs in every task: the job (diffmic.launch.job) as its JSON, so that what a Slurm task runs is read
    exactly as a local process reads it. Picklable; `checkpoint` is submitit's hook for preemption and
    timeouts."""

    job: str  # to_json of a TrainJob or an EvalJob
    max_requeues: int = 3
    requeues: int = 0
    attempts: list = field(default_factory=list)

    @property
    def kind(self) -> str:
        return json.loads(self.job)["kind"]

    def __call__(self):
        import submitit

        from .job import job_from_json

        environment = submitit.JobEnvironment()
        # Every rank must see the same variables torchrun would set: Accelerate reads them.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if "OMP_NUM_THREADS" not in os.environ:  # one thread pool per task, sized to its CPUs
            import torch

            torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
        outcome = job_from_json(self.job).run(progress=False, announce=False)
        if outcome.get("stopped_by") == "signal":
            self._requeue_after_save(environment)
        return outcome

    def _requeue_after_save(self, environment) -> None:
        """The trainer took the preemption signal, finished its step and saved on every rank; hand the
        signal back to submitit, whose handler (on rank 0) calls `checkpoint` and requeues the job."""
        handler = signal.getsignal(signal.SIGUSR2)
        if callable(handler):
            handler(signal.SIGUSR2, None)
        if environment.global_rank != 0:
            # Slurm requeues the whole job; this task just waits to be stopped.
            time.sleep(3600)

    def checkpoint(self, *args, **kwargs):
        """A fresh submission of the same job: it resumes from the run folder's latest checkpoint."""
        import submitit

        if self.requeues >= self.max_requeues:
            return None  # submitit then ends the job instead of requeueing it
        following = DistributedJob(self.job, self.max_requeues, self.requeues + 1,
                                   self.attempts + [time.strftime("%Y-%m-%dT%H:%M:%S")])
        return submitit.helpers.DelayedSubmission(following)


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None


def job_parameters(options: SlurmOptions, job_name: str, array_parallelism: int = 0) -> dict:
    """The one mapping from the flags to the job's resources, in submitit's AutoExecutor names (generic ones, then
    `slurm_` ones that only a Slurm cluster reads): the executor takes them, and the --dry-run script is rendered
    from them. `array_parallelism`: for a job array, how many of its tasks may run at once."""
    parameters = {"nodes": options.nodes, "tasks_per_node": options.tasks(), "timeout_min": options.minutes(),
                  "cpus_per_task": options.cpus_per_task or (8 if options.gpus else 1), "name": job_name}
    if options.gpus:
        parameters["gpus_per_node"] = options.gpus
    if options.mem_gb:
        parameters["mem_gb"] = options.mem_gb
    if not options.local:
        cluster = {"partition": options.partition, "account": options.account, "qos": options.qos,
                   "constraint": options.constraint, "exclude": options.exclude, "signal_delay_s": SIGNAL_DELAY_S,
                   "array_parallelism": array_parallelism}
        parameters.update({f"slurm_{key}": value for key, value in cluster.items() if value})
    return parameters


def make_executor(options: SlurmOptions, log_dir: Path, job_name: str, array_parallelism: int = 0):
    import submitit

    if not options.local and not slurm_available():
        raise SlurmError("--slurm needs Slurm, but `sbatch` is not on this machine's PATH; run on a login node "
                         "of your cluster, or use --local to run the same job here through submitit")
    # submitit requeues on preemption and within --max-requeues time-outs.
    executor = submitit.AutoExecutor(folder=str(log_dir / "%j"), cluster="local" if options.local else "slurm",
                                     slurm_max_num_timeout=options.max_requeues)
    executor.update_parameters(**job_parameters(options, job_name, array_parallelism))
    return executor


def sbatch_script(options: SlurmOptions, log_dir: Path, job_name: str, array_tasks: int = 0,
                  array_parallelism: int = 0) -> str:
    """The sbatch script of the job (for --dry-run), rendered by submitit's own template from the parameters
    `make_executor` passes, renamed to sbatch's names as submitit's Slurm executor renames them; nothing is
    submitted and Slurm need not be installed. `array_tasks` > 0: a job array of that many tasks."""
    from submitit.slurm.slurm import SlurmExecutor, _convert_mem, _make_sbatch_string

    sbatch_names = SlurmExecutor._equivalence_dict()
    # The script Slurm would run, also for --local (whose job has no script of its own).
    parameters = {key.removeprefix("slurm_") if key.startswith("slurm_") else sbatch_names[key]: value
                  for key, value in job_parameters(replace(options, local=False), job_name, array_parallelism).items()}
    if array_tasks:
        parameters["map_count"] = array_tasks
    if "mem" in parameters:
        parameters["mem"] = _convert_mem(parameters["mem"])
    folder = str(log_dir / "%j")
    return _make_sbatch_string(command=f"python -u -m submitit.core._submit {folder}", folder=folder, **parameters)


def job_record(submitted, kind: str, options: SlurmOptions, log_dir: Path, when: str) -> dict:
    """What `diffmic status` reads about a submitted job (or array task): its id, logs and resources."""
    record = {"job_id": submitted.job_id, "kind": kind, "log_dir": str(log_dir / str(submitted.job_id)),
              "folder": str(log_dir), "local": options.local, "submitted": when, "options": asdict(options)}
    if options.local:  # lets `diffmic status` tell a running local job from a dead one
        record["pid"] = submitted._process.pid
    return record


def submit(job: DistributedJob, options: SlurmOptions, run_dir: Path, job_name: str):
    """Submits the job and records its id in RUN/slurm_<kind>.json for `diffmic status`."""
    folder = RunFolder(run_dir)
    log_dir = folder.slurm_logs
    folder.path.mkdir(parents=True, exist_ok=True)
    executor = make_executor(options, log_dir, job_name)
    submitted = executor.submit(job)
    record = job_record(submitted, job.kind, options, log_dir, time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_json_atomic(folder.job_file(job.kind), record)
    return submitted, record


def check_array(options: SlurmOptions, parallelism: int) -> None:
    if options.nodes != 1 or options.tasks() != 1:
        raise SlurmError("each run of a --slurm sweep is one process on one node: pass --gpus 1 (or --gpus 0 "
                         "--tasks-per-node 1) and --nodes 1")
    if parallelism < 1:
        raise SlurmError(f"--array-parallelism {parallelism}: use at least 1")


def submit_array(tasks: list, options: SlurmOptions, log_dir: Path, job_name: str, parallelism: int):
    """Submits one job array, a task per callable (one process each), at most `parallelism` running at once;
    returns submitit's jobs and a record per task (as `submit` writes for one job, for `job_state`)."""
    check_array(options, parallelism)
    log_dir.mkdir(parents=True, exist_ok=True)
    executor = make_executor(options, log_dir, job_name, parallelism)
    with executor.batch():
        jobs = [executor.submit(task) for task in tasks]
    submitted = time.strftime("%Y-%m-%dT%H:%M:%S")
    return jobs, [job_record(job, "sweep", options, log_dir, submitted) for job in jobs]


def job_records(run_dir: Path) -> list[dict]:
    """The records of the jobs submitted for a run with --slurm (none for a run trained here)."""
    paths = [RunFolder(run_dir).job_file(kind) for kind in ("train", "eval")]
    fix = "restore it from a copy; the job's logs are in RUN/slurm/"
    return [read_json_object(path, fix) for path in paths if path.is_file()]


def job_state(record: dict) -> str:
    """The job's state as Slurm accounting reports it (COMPLETED, FAILED, RUNNING, PENDING, ...)."""
    import submitit

    if record.get("local"):
        return _local_state(record)
    # Accounting can say RUNNING for a moment after the end: read the state anew each call.
    return submitit.SlurmJob(folder=record["folder"] + "/%j", job_id=record["job_id"]).state.split()[0]


def _local_state(record: dict) -> str:
    """A local job seen from another process (submitit only knows the state of its own children):
    COMPLETED once every task left a successful result, FAILED on an error result or a dead job."""
    tasks = record["options"]["nodes"] * SlurmOptions(**record["options"]).tasks()
    results = sorted(Path(record["log_dir"]).glob("*_result.pkl"))
    outcomes = [job_outcome(path) for path in results]
    if any(outcome != "success" for outcome in outcomes):
        return "FAILED"
    if len(outcomes) >= tasks:
        return "COMPLETED"
    return "RUNNING" if pid_alive(record.get("pid", 0), None) else "FAILED"


class _Inert:
    """What every object a result file names becomes: `status` needs only the outcome string, and a file in a
    run folder (shared, copied off clusters) must never run code when it is read."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _OutcomeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        return _Inert

    def persistent_load(self, pid):
        return None


def job_outcome(path: Path) -> str:
    """'success' or 'error' from a task's submitit result file (a pickle of (outcome, value)), read without
    building any object it names; anything unreadable counts as 'error'."""
    try:
        with open(path, "rb") as handle:
            loaded = _OutcomeUnpickler(handle).load()
    except Exception:  # a truncated or foreign file: the task did not leave a result we can trust
        return "error"
    return loaded[0] if isinstance(loaded, tuple) and loaded and isinstance(loaded[0], str) else "error"
