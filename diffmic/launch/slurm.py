"""Slurm jobs through submitit: the same training and evaluation functions as a local run, one task
per GPU (or N CPU tasks), preemption handled by saving, requeueing and resuming.

The submitted callable (`DistributedJob`) lives in the installed package, so a job needs nothing but
the environment that submitted it. Inside each task it exports the torch.distributed variables from
submitit's job environment, then calls `diffmic.engine.train` or `diffmic.evaluation.runner.evaluate_run`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import SlurmError
from ..fileio import write_json_atomic

# RUN/slurm_train.json and RUN/slurm_eval.json record the submitted jobs for `diffmic status`.
JOB_FILE = "slurm_{kind}.json"
UNFINISHED = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
              "RESIZING", "SUSPENDED", "UNKNOWN", "READY"}
FINISHED_OK = {"COMPLETED", "DONE"}


@dataclass
class SlurmOptions:
    gpus: int = 8  # per node; one task per GPU
    nodes: int = 1
    tasks_per_node: int = 0  # CPU jobs (gpus = 0): number of processes per node
    partition: str = ""
    time: str = "24:00:00"
    cpus_per_task: int = 0  # 0: 8 per GPU task, 1 per CPU task
    mem_gb: int = 0  # 0: the partition's default
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclude: str = ""
    max_requeues: int = 3
    local: bool = False  # submitit's local executor instead of Slurm (no cluster needed)

    def __post_init__(self):
        if not re.fullmatch(r"\d+(-\d+(:\d+){0,2}|(:\d+){0,2})", self.time):
            raise SlurmError(f"--time {self.time!r} is not a Slurm time; use MM, HH:MM:SS or D-HH:MM:SS "
                             f"(e.g. --time 24:00:00)")
        if self.gpus < 0 or self.nodes < 1 or self.tasks_per_node < 0 or self.max_requeues < 0:
            raise SlurmError("--gpus, --tasks-per-node and --max-requeues must be >= 0 and --nodes >= 1")

    def tasks(self) -> int:
        return self.gpus if self.gpus > 0 else max(self.tasks_per_node, 1)

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
    """What runs in every task. Picklable; `checkpoint` is submitit's hook for preemption and timeouts."""

    kind: str  # "train" or "eval"
    arguments: dict
    run_dir: str
    max_requeues: int = 3
    requeues: int = 0
    attempts: list = field(default_factory=list)

    def __call__(self):
        import submitit

        environment = submitit.JobEnvironment()
        # Every rank must see the same variables torchrun would set: Accelerate reads them.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if "OMP_NUM_THREADS" not in os.environ:  # one thread pool per task, sized to its CPUs
            import torch

            torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
        if self.kind == "eval":
            from ..evaluation.runner import evaluate_run

            result = evaluate_run(**self.arguments, progress=False)
            return {"out_dir": str(result.out_dir) if result.out_dir else None, "accuracy": result.metrics["accuracy"]}
        from ..config import config_from_dict
        from ..engine import train

        config = config_from_dict(self.arguments["config"])
        result = train(config, self.arguments["shards"], self.run_dir, progress=False,
                       facts=self.arguments.get("facts"), allow_changes=self.arguments.get("allow_changes", ()))
        if result.stopped_by == "signal":
            self._requeue_after_save(environment)
        return {"step": result.step, "stopped_by": result.stopped_by, "best_step": result.best_step,
                "last_checkpoint": str(result.last_checkpoint)}

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
        following = DistributedJob(self.kind, self.arguments, self.run_dir, self.max_requeues, self.requeues + 1,
                                   self.attempts + [time.strftime("%Y-%m-%dT%H:%M:%S")])
        return submitit.helpers.DelayedSubmission(following)


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None


def make_executor(options: SlurmOptions, log_dir: Path, job_name: str):
    import submitit

    if not options.local and not slurm_available():
        raise SlurmError("--slurm needs Slurm, but `sbatch` is not on this machine's PATH; run on a login node "
                         "of your cluster, or use --local to run the same job here through submitit")
    # Preemption sends SIGUSR2 ahead of the kill; submitit requeues within --max-requeues timeouts.
    executor = submitit.AutoExecutor(folder=str(log_dir / "%j"), cluster="local" if options.local else "slurm",
                                     slurm_max_num_timeout=options.max_requeues)
    tasks = options.tasks()
    cpus = options.cpus_per_task or (8 if options.gpus else 1)
    parameters = {"nodes": options.nodes, "tasks_per_node": tasks, "cpus_per_task": cpus,
                  "timeout_min": options.minutes(), "name": job_name}
    if options.gpus:
        parameters["gpus_per_node"] = options.gpus
    if options.mem_gb:
        parameters["mem_gb"] = options.mem_gb
    if not options.local:
        extra = {"partition": options.partition, "account": options.account, "qos": options.qos,
                 "constraint": options.constraint, "exclude": options.exclude}
        parameters.update({f"slurm_{key}": value for key, value in extra.items() if value})
        parameters["slurm_signal_delay_s"] = 120
    executor.update_parameters(**parameters)
    return executor


def sbatch_script(options: SlurmOptions, log_dir: Path, job_name: str) -> str:
    """The sbatch script of the job (for --dry-run), rendered by submitit's own template; nothing is
    submitted and Slurm need not be installed."""
    from submitit.slurm.slurm import _make_sbatch_string

    parameters = {"nodes": options.nodes, "ntasks_per_node": options.tasks(),
                  "cpus_per_task": options.cpus_per_task or (8 if options.gpus else 1),
                  "time": options.minutes(), "job_name": job_name, "signal_delay_s": 120}
    if options.gpus:
        parameters["gpus_per_node"] = options.gpus
    if options.mem_gb:
        parameters["mem"] = f"{options.mem_gb}GB"
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(options, key):
            parameters[key] = getattr(options, key)
    folder = str(log_dir / "%j")
    return _make_sbatch_string(command=f"python -u -m submitit.core._submit {folder}", folder=folder, **parameters)


def submit(job: DistributedJob, options: SlurmOptions, run_dir: Path, job_name: str):
    """Submits the job and records its id in RUN/slurm_<kind>.json for `diffmic status`."""
    log_dir = run_dir / "slurm"
    run_dir.mkdir(parents=True, exist_ok=True)
    executor = make_executor(options, log_dir, job_name)
    submitted = executor.submit(job)
    record = {"job_id": submitted.job_id, "kind": job.kind, "log_dir": str(log_dir / str(submitted.job_id)),
              "folder": str(log_dir), "local": options.local, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "options": asdict(options)}
    if options.local:  # lets `diffmic status` tell a running local job from a dead one
        record["pid"] = submitted._process.pid
    write_json_atomic(run_dir / JOB_FILE.format(kind=job.kind), record)
    return submitted, record


def job_records(run_dir: Path) -> list[dict]:
    paths = [Path(run_dir) / JOB_FILE.format(kind=kind) for kind in ("train", "eval")]
    records = [json.loads(path.read_text()) for path in paths if path.is_file()]
    if not records:
        raise SlurmError(f"{run_dir} holds no slurm_train.json or slurm_eval.json: no job was submitted for it "
                         f"with --slurm (is it a run folder?)")
    return records


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
    return "RUNNING" if _alive(record.get("pid", 0)) else "FAILED"


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


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
