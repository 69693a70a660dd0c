"""A job: one training or one evaluation, resolved once by the command that asks for it and run the same way by
whoever executes it: that command itself, each of N local processes, each task of a Slurm job, or the child
process that runs one step of a sweep. `TrainJob` and `EvalJob` are the one description of such work, with
`run()` and one serialisation (JSON: `to_json`, `job_from_json`).

    python -m diffmic.launch.job SPEC.json [--progress]     (what a launched process runs; not meant to be typed)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from ..config import Config, EvalConfig, config_from_dict
from ..errors import USER_ERRORS, file_system_error


def _absolute(path: str | os.PathLike | None) -> str | None:
    return str(Path(path).resolve()) if path else None


@dataclass
class TrainJob:
    """Train, resume or fine-tune the run `run_dir` (None: a new folder under runs/) on `shards` with `config`."""

    kind: ClassVar[str] = "train"
    config: Config
    shards: str
    run_dir: str | None = None
    allow_changes: list[str] = field(default_factory=list)  # settings a resume may change (--allow-changes)
    facts: dict = field(default_factory=dict)  # recorded in run.json and shown in the banner (config_file, command)

    @classmethod
    def from_values(cls, values: dict) -> TrainJob:
        return cls(**{**values, "config": config_from_dict(values["config"])})

    def absolute(self) -> TrainJob:
        """The same job with absolute paths, for processes that may start in another folder."""
        from ..data.storage import absolute_location

        return replace(self, shards=absolute_location(self.shards), run_dir=_absolute(self.run_dir))

    def run(self, progress: bool = True, announce: bool = True) -> dict:
        """Trains; the main process ends with the run's summary line when `announce`."""
        from ..engine import train

        result = train(self.config, self.shards, self.run_dir, progress=progress, facts=self.facts,
                       allow_changes=self.allow_changes)
        if announce and int(os.environ.get("RANK", "0")) == 0:
            from rich.console import Console

            Console().print(result.summary(self.config.train.select_metric), highlight=False, soft_wrap=True)
        return {"step": result.step, "stopped_by": result.stopped_by, "best_step": result.best_step,
                "last_checkpoint": str(result.last_checkpoint), "processes": result.processes}


@dataclass
class EvalJob:
    """Evaluate a checkpoint of the run `run_dir` on a split with `settings` (None: the checkpoint's own eval
    config), writing to `out_dir` (None: the run folder's default evaluation folder)."""

    kind: ClassVar[str] = "eval"
    run_dir: str
    checkpoint: str = "best"
    split: str = "test"
    settings: EvalConfig | None = None
    out_dir: str | None = None
    shards: str | None = None  # None: the shards the run trained on

    @classmethod
    def from_values(cls, values: dict) -> EvalJob:
        settings = values.get("settings")
        return cls(**{**values, "settings": EvalConfig(**settings) if settings is not None else None})

    def absolute(self) -> EvalJob:
        from ..data.storage import absolute_location

        return replace(self, run_dir=_absolute(self.run_dir), out_dir=_absolute(self.out_dir),
                       shards=absolute_location(self.shards))

    def run(self, progress: bool = True, announce: bool = True) -> dict:
        """Evaluates; the main process ends with the metrics table and the files written when `announce`."""
        from ..evaluation.runner import evaluate_run, print_result

        result = evaluate_run(self.run_dir, self.checkpoint, self.split, self.settings, self.out_dir, self.shards,
                              progress)
        if announce and result.out_dir is not None:
            print_result(result, self.split, self.checkpoint)
        return {"out_dir": str(result.out_dir) if result.out_dir else None, "accuracy": result.metrics["accuracy"]}


Job = TrainJob | EvalJob
KINDS: dict[str, type] = {job.kind: job for job in (TrainJob, EvalJob)}


def to_json(job: Job) -> str:
    return json.dumps({"kind": job.kind, **asdict(job)})


def job_from_json(text: str) -> Job:
    values = json.loads(text)
    return KINDS[values.pop("kind")].from_values(values)


@contextmanager
def job_file(job: Job) -> Iterator[Path]:
    """The job as a JSON file in a temporary folder, for the processes that run it (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="diffmic-job-") as folder:
        path = Path(folder) / f"{job.kind}.json"
        path.write_text(to_json(job))
        yield path


def job_command(spec: Path, progress: bool = False) -> list[str]:
    """The arguments after `python` that run the job in `spec` in a new process."""
    return ["-m", "diffmic.launch.job", str(spec), *(["--progress"] if progress else [])]


def main(argv: list[str]) -> None:
    """Runs the job of a spec file; a user's mistake is one line on stderr and exit status 2, as in the CLI."""
    try:
        job_from_json(Path(argv[0]).read_text()).run(progress="--progress" in argv[1:])
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except OSError as error:  # a file system refusal that names its file, as in the CLI
        converted = file_system_error(error)
        if converted is None:
            raise
        print(f"error: {converted}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
