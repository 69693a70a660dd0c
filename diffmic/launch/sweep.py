"""`diffmic sweep`: configs x seeds x value grids x folds as runs under one folder, each trained then
evaluated on its test split, resumable by running the same command again.

The plan is `SWEEP/sweep.json` (every run's config file, overrides, seed, fold and, with --slurm, its array
task). Each run is an ordinary run folder `SWEEP/runs/<name>/`, trained and evaluated by the same jobs
(diffmic.launch.job) as `diffmic train` and `diffmic eval`, each in a child process: one run's crash cannot
take the sweep down, and a resumed run goes through the trainer's own resume from its latest checkpoint.
Whoever executes a run (the local loop, or its Slurm array task) writes its status to
`SWEEP/runs/<name>/sweep-status.json`, so array tasks running at once never write the same file. Both files are
sealed with their checksum (diffmic.fileio): a damaged one is refused by name, with the way back. `diffmic sweep`
holds SWEEP/.lock while it runs or submits, so a second one on the same folder stops at once (diffmic.run.lock).
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..errors import USER_ERRORS, RunFileError, UserError
from ..fileio import open_for_append, read_sealed_json, write_sealed_json
from ..run import RunFolder
from .job import EvalJob, Job, TrainJob, job_command, job_file

SWEEP_FILE = "sweep.json"
STATUS_FIELDS = ("status", "error", "started", "ended")
STATUSES = ("pending", "queued", "training", "evaluating", "finished", "failed")
RUN_NAME = re.compile(r"[A-Za-z0-9_.=-]+")  # what _slug leaves: a run folder's name, never a path
STATUS_FIX = "delete it and run the sweep's command again: the run goes on from its checkpoints"
PLAN_FIX = ("restore it from a copy, or delete it and run the sweep's command again (its runs' states are read "
            "back from their folders)")


class SweepError(UserError, ValueError):
    """A sweep cannot be planned or resumed as asked; the message says what to change."""


@dataclass
class SweepRun:
    name: str
    config_file: str
    overrides: list[str]  # --set values of this run, grid values and seed (and fold) included
    seed: int
    fold: int | None = None
    grid: dict[str, str] = field(default_factory=dict)  # the swept keys and this run's values
    status: str = "pending"
    error: str = ""
    started: str = ""
    ended: str = ""
    # Who executes it (host, pid, Slurm job: the run lock's holder record), so that `diffmic status` can tell
    # a run that is training from one whose process was killed or whose job ended.
    executor: dict = field(default_factory=dict)

    def folder(self, sweep_dir: Path) -> RunFolder:
        return RunFolder(Path(sweep_dir) / "runs" / self.name)

    def run_dir(self, sweep_dir: Path) -> Path:
        return self.folder(sweep_dir).path

    def metrics_file(self, sweep_dir: Path) -> Path:
        """RUN/eval/test/metrics.json: the evaluation the sweep writes, which `diffmic compare` reads."""
        return self.folder(sweep_dir).test_evaluation / "metrics.json"

    def write_status(self, sweep_dir: Path) -> None:
        write_sealed_json(self.folder(sweep_dir).sweep_status_file,
                          {**{key: getattr(self, key) for key in STATUS_FIELDS}, "executor": self.executor})

    def read_status(self, sweep_dir: Path) -> None:
        """The latest word on this run from its folder (none yet: the plan's); RunFileError naming a damaged one."""
        path = self.folder(sweep_dir).sweep_status_file
        try:
            values = read_sealed_json(path, STATUS_FIX)
        except FileNotFoundError:
            return
        problem = _status_problem(values)
        if problem:
            raise RunFileError(f"{path} is damaged ({problem}); {STATUS_FIX}")
        for key in STATUS_FIELDS:
            setattr(self, key, values.get(key, getattr(self, key)))
        self.executor = values.get("executor") or {}

    def shown_status(self) -> str:
        """The status, or "interrupted" for a run left training or evaluating by a process that is dead
        (on this host) or a Slurm job that ended: running the sweep again resumes it."""
        from ..run.lock import is_stale, this_holder

        if self.status in ("training", "evaluating") and self.executor and is_stale(self.executor, this_holder("")):
            return "interrupted"
        return self.status


def _status_problem(values: dict) -> str:
    """What makes a run's status record (in sweep-status.json or sweep.json) not one diffmic writes; "" when none."""
    if values.get("status", "pending") not in STATUSES:
        return f"unknown status {values.get('status')!r}"
    if any(not isinstance(values.get(key, ""), str) for key in STATUS_FIELDS):
        return "a status field is not text"
    if not isinstance(values.get("executor", {}), dict):
        return "its executor is not a record"
    return ""


def sweep_logs(sweep_dir: Path) -> Path:
    """SWEEP/slurm: submitit's logs of the sweep's job array."""
    return Path(sweep_dir) / "slurm"


def parse_grid(values: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """`--set key=v1,v2` becomes a swept key; `--set key=v` (one value) a fixed override for every run.
    A value in brackets (`key=[1,2]`) is one YAML list, not two values."""
    grid, fixed = {}, []
    for text in values:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"--set {text!r} must look like key=value or key=v1,v2,...")
        options = [raw] if raw.strip().startswith("[") else [part.strip() for part in raw.split(",")]
        if len(options) > 1:
            if key in grid:
                raise SweepError(f"--set {key}=... is given twice; list all its values once: {key}=v1,v2")
            grid[key.strip()] = options
        else:
            fixed.append(f"{key.strip()}={raw.strip()}")
    return grid, fixed


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")


def plan_runs(configs: list[tuple[str, int]], seeds: int, grid: dict[str, list[str]], fixed: list[str],
              folds: int = 0) -> list[SweepRun]:
    """Every combination, in a fixed order: config, grid values, seed, fold. `configs` holds (config
    file, its train.seed); seed i of a config is its train.seed + i."""
    if seeds < 1:
        raise SweepError(f"--seeds {seeds}: use at least 1")
    runs = []
    keys = list(grid)
    for (config_file, base_seed), values in itertools.product(configs, itertools.product(*grid.values())):
        chosen = dict(zip(keys, values))
        for offset, fold in itertools.product(range(seeds), range(folds) if folds else [None]):
            seed = base_seed + offset
            parts = [Path(config_file).stem, *(f"{key.split('.')[-1]}={value}" for key, value in chosen.items()),
                     f"seed{seed}", *([f"fold{fold}"] if fold is not None else [])]
            overrides = [*fixed, *(f"{key}={value}" for key, value in chosen.items()), f"train.seed={seed}",
                         *([f"data.fold={fold}"] if fold is not None else [])]
            runs.append(SweepRun(_slug("-".join(parts)), str(config_file), overrides, seed, fold, chosen))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise SweepError("two runs of the sweep get the same name: give the configs different file names")
    return runs


@dataclass
class SweepPlan:
    command: str
    shards: str | None
    runs: list[SweepRun]
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    jobs: dict[str, dict] = field(default_factory=dict)  # run name -> its Slurm array task (launch.slurm record)

    def save(self, sweep_dir: Path) -> None:
        write_sealed_json(sweep_dir / SWEEP_FILE, {**asdict(self), "runs": [asdict(run) for run in self.runs]})

    def run(self, name: str) -> SweepRun:
        return next(run for run in self.runs if run.name == name)

    @classmethod
    def load(cls, sweep_dir: Path) -> "SweepPlan":
        path = Path(sweep_dir) / SWEEP_FILE
        if not path.is_file():
            raise SweepError(f"{path} is missing: is {sweep_dir} a folder made by `diffmic sweep`? If it is, run the "
                             f"sweep's command again: it rebuilds the plan from its runs' folders")
        values = read_sealed_json(path, PLAN_FIX)
        try:
            plan = cls(values["command"], values["shards"], [SweepRun(**run) for run in values["runs"]],
                       values["created"], values.get("jobs", {}))
        except (KeyError, TypeError) as error:
            raise RunFileError(f"{path} is damaged (it is not the plan diffmic writes: {error}); {PLAN_FIX}") from None
        problem = _plan_problem(plan)
        if problem:
            raise RunFileError(f"{path} is damaged ({problem}); {PLAN_FIX}")
        for run in plan.runs:  # the run folders hold the latest word on each run
            run.read_status(sweep_dir)
        return plan


def _plan_problem(plan: SweepPlan) -> str:
    """What makes a loaded plan not one diffmic writes (a run name that is a path, a status it never writes)."""
    if not isinstance(plan.command, str) or not isinstance(plan.jobs, dict):
        return "its command or jobs are of the wrong type"
    for run in plan.runs:
        if not isinstance(run.name, str) or not RUN_NAME.fullmatch(run.name) or run.name in (".", ".."):
            return f"the run name {run.name!r} is not one diffmic makes"
        if not isinstance(run.overrides, list) or not isinstance(run.config_file, str):
            return f"run {run.name}'s config or overrides are of the wrong type"
        problem = _status_problem(asdict(run))
        if problem:
            return f"run {run.name}: {problem}"
    return ""


def looks_like_sweep(folder: Path) -> bool:
    """A sweep folder, also one that lost its sweep.json: runs/ beside no config.yaml of a run of its own."""
    folder = Path(folder)
    return (folder / SWEEP_FILE).is_file() or ((folder / "runs").is_dir() and
                                               not RunFolder(folder).config_file.exists())


def merge_with_existing(sweep_dir: Path, plan: SweepPlan) -> SweepPlan:
    """Re-running a sweep keeps the state of its runs; a different set of runs is refused (it would mix two
    experiments under one folder)."""
    if not (sweep_dir / SWEEP_FILE).is_file():
        for run in plan.runs:  # a sweep.json deleted (or never written): each run folder still says how it stands
            run.read_status(sweep_dir)
        return plan
    previous = SweepPlan.load(sweep_dir)
    old = {run.name: run for run in previous.runs}
    if set(old) != {run.name for run in plan.runs} or any(old[run.name].overrides != run.overrides
                                                           for run in plan.runs):
        raise SweepError(f"{sweep_dir} holds another sweep ({len(old)} runs, planned by `{previous.command}`); "
                         f"re-run that command to resume it, or choose another --out")
    return SweepPlan(plan.command, plan.shards, [old[run.name] for run in plan.runs], previous.created,
                     previous.jobs)


def _die_with_parent() -> None:
    """Children get SIGTERM when the sweep dies, even by SIGKILL: no orphan keeps training unseen (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_child(job: Job, command: str, log: Path) -> int:
    """The job in a child process, its output appended to `log` under the `diffmic` command it amounts to; the
    exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open_for_append(log) as handle, job_file(job) as spec:
        handle.write(f"\n$ {command}\n")
        handle.flush()
        child = subprocess.Popen([sys.executable, *job_command(spec)], stdout=handle, stderr=subprocess.STDOUT,
                                 preexec_fn=_die_with_parent if os.name == "posix" else None)
        try:
            return child.wait()
        except BaseException:  # Ctrl-C or a signal: the child saves its checkpoint and stops too
            child.send_signal(signal.SIGTERM)
            child.wait()
            raise


def _last_lines(log: Path, count: int = 3) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    return " | ".join(lines[-count:])[-600:]


def train_job(run: SweepRun, folder: RunFolder, shards: str | None) -> tuple[TrainJob, str]:
    """The run's training (or its resume) and the `diffmic train` command it amounts to, which run.json records."""
    from ..config import load_config
    from ..data import shard_dir_for

    config = load_config(run.config_file, run.overrides)
    args = ["train", "--config", run.config_file, "--run-dir", str(folder.path),
            *(["--shards", shards] if shards else []),
            *[item for override in run.overrides for item in ("--set", override)]]
    command = shlex.join(["diffmic", *args])
    facts = {"config_file": str(Path(run.config_file).resolve()), "command": command}
    return TrainJob(config, shards or shard_dir_for(config.data), str(folder.path), facts=facts), command


def eval_job(folder: RunFolder) -> tuple[EvalJob, str]:
    """The run's evaluation on its test split into RUN/eval/test, and the `diffmic eval` command it amounts to."""
    from ..checkpoint import best_step

    # The best checkpoint when the run validated, else its last one (train.val_every=0).
    which = "best" if best_step(folder) is not None else "last"
    job = EvalJob(str(folder.path), which, "test", out_dir=str(folder.test_evaluation))
    return job, shlex.join(["diffmic", "eval", "--run", job.run_dir, "--checkpoint", which, "--split", "test",
                            "--out", job.out_dir])


def execute_run(run: SweepRun, sweep_dir: Path, shards: str | None,
                on_change: Callable[[SweepRun], None] = lambda run: None) -> SweepRun:
    """Trains (or resumes) and evaluates one run, each in a child process; its status is kept up to date in its
    folder and through `on_change`."""
    from ..run.lock import this_holder

    folder = run.folder(sweep_dir)
    run.started, run.error, run.executor = time.strftime("%Y-%m-%dT%H:%M:%S"), "", this_holder("")

    def changed(run: SweepRun) -> None:
        run.write_status(sweep_dir)
        on_change(run)

    steps = (("training", lambda: train_job(run, folder, shards)), ("evaluating", lambda: eval_job(folder)))
    for status, make_job in steps:
        run.status = status
        changed(run)
        try:
            job, command = make_job()  # after training: the evaluation reads which checkpoints it left
        except USER_ERRORS as error:  # a config file gone or broken since the sweep was planned
            run.status, run.error = "failed", f"{status} failed: {error}"
            break
        if _run_child(job, command, folder.sweep_log) != 0:
            log = folder.sweep_log
            run.status, run.error = "failed", f"{status} failed: {_last_lines(log)} (log: {log})"
            break
    else:
        run.status = "finished"
    run.ended = time.strftime("%Y-%m-%dT%H:%M:%S")
    changed(run)
    return run


def is_done(run: SweepRun, sweep_dir: Path) -> bool:
    return run.status == "finished" and run.metrics_file(sweep_dir).is_file()


def runs_to_do(plan: SweepPlan, sweep_dir: Path, report: Callable[[str], None] = print) -> list[SweepRun]:
    """The runs not yet finished: pending, interrupted (they resume) and failed (they are retried)."""
    todo = [run for run in plan.runs if not is_done(run, sweep_dir)]
    report(f"{len(plan.runs) - len(todo)} of {len(plan.runs)} run(s) already finished; {len(todo)} to go")
    return todo


def run_locally(plan: SweepPlan, sweep_dir: Path, report: Callable[[str], None] = print) -> list[SweepRun]:
    """The runs one after another; finished ones are skipped, interrupted ones resume, failed ones are
    retried. Returns the runs that failed."""
    todo = runs_to_do(plan, sweep_dir, report)

    def save(_run: SweepRun) -> None:
        plan.save(sweep_dir)

    for number, run in enumerate(todo, start=1):
        resumed = " (resuming)" if run.status in ("training", "evaluating", "failed") else ""
        report(f"[{number}/{len(todo)}] {run.name}{resumed}")
        execute_run(run, sweep_dir, plan.shards, save)
        report(f"[{number}/{len(todo)}] {run.name}: {run.status}" + (f": {run.error}" if run.error else ""))
    return [run for run in plan.runs if run.status == "failed"]


@dataclass
class SweepTask:
    """One run of a sweep as one Slurm array task: the same `execute_run` as the local loop. Picklable;
    `checkpoint` is submitit's hook for preemption and time-outs (the run resumes from its checkpoints)."""

    sweep_dir: str
    name: str
    max_requeues: int = 3
    requeues: int = 0

    def __call__(self) -> str:
        sweep_dir = Path(self.sweep_dir)
        plan = SweepPlan.load(sweep_dir)
        run = execute_run(plan.run(self.name), sweep_dir, plan.shards)
        if run.status == "failed":  # the array task ends FAILED, and `diffmic status` says why
            raise RuntimeError(f"sweep run {run.name}: {run.error}")
        return run.status

    def checkpoint(self, *args, **kwargs):
        import submitit

        if self.requeues >= self.max_requeues:
            return None
        return submitit.helpers.DelayedSubmission(replace(self, requeues=self.requeues + 1))


def submit_sweep(plan: SweepPlan, sweep_dir: Path, options, parallelism: int,
                 report: Callable[[str], None] = print) -> list:
    """The unfinished runs as one Slurm job array (at most `parallelism` at once), recorded in sweep.json.
    Refused while an earlier array task of this sweep is still queued or running: it would run twice."""
    from .slurm import UNFINISHED, job_state, submit_array

    todo = runs_to_do(plan, sweep_dir, report)
    # Only an unfinished run's task matters (accounting may say RUNNING a moment after a task finished).
    busy = [run.name for run in todo if run.name in plan.jobs and job_state(plan.jobs[run.name]) in UNFINISHED]
    if busy:
        raise SweepError(f"{len(busy)} run(s) of {sweep_dir} are still queued or running as Slurm jobs "
                         f"({', '.join(plan.jobs[name]['job_id'] for name in busy[:4])}); wait for them "
                         f"(diffmic status {sweep_dir}) and run the command again")
    if not todo:
        return []
    tasks = [SweepTask(str(sweep_dir.resolve()), run.name, options.max_requeues) for run in todo]
    jobs, records = submit_array(tasks, options, sweep_logs(sweep_dir), f"diffmic-sweep-{sweep_dir.name}", parallelism)
    for run, record in zip(todo, records):
        run.status, run.error = "queued", ""
        run.write_status(sweep_dir)
        plan.jobs[run.name] = record
    plan.save(sweep_dir)
    return jobs
