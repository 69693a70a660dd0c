"""A run folder: `RunFolder` names every path in it, makes new run names and keeps its record (config.yaml and
run.json). Nothing else in diffmic joins a file name onto a run folder.

    RUN/config.yaml              the resolved config, written at the start of every session (its checksum last)
    RUN/run.json                 provenance (git commit, shards, manifest hash) and the history of the sessions
    RUN/metrics.jsonl            a row per logging interval and per validation (log.py)
    RUN/curves.png               the training curves drawn from it (diffmic report)
    RUN/.lock                    the one writer's lock (lock.py)
    RUN/checkpoints/             the checkpoints: diffmic.checkpoint owns what is inside
    RUN/tensorboard/             TensorBoard's event files (train.log_with)
    RUN/eval/<name>/             one evaluation: metrics.json, predictions.csv and the figures
    RUN/eval/test/               the test-split evaluation a sweep writes and `diffmic compare` reads first
    RUN/predictions/<time>.csv   a `diffmic predict` table
    RUN/slurm/, RUN/slurm_<kind>.json   submitit's logs and the record of the job (diffmic status)
    RUN/sweep.log, RUN/sweep-status.json   a run of a sweep: its commands' output and its status

config.yaml, run.json, metrics.jsonl and sweep-status.json are sealed with their checksum (diffmic.fileio): a damaged
one is refused by name, never silently replaced or believed.

Imports nothing heavy: `diffmic status`, `report` and `compare` read run folders without torch.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..config import Config, dump_config
from ..errors import RunFileError
from ..fileio import read_sealed_json, read_sealed_text, sealed_text, write_sealed_json, write_text_atomic

RUNS_ROOT = Path("runs")  # where a run goes when no folder is named, relative to the working folder
RECORD_FIX = ("restore it from a copy, or delete it: the run then starts a new history in run.json (its checkpoints "
              "and metrics.jsonl are kept)")
CONFIG_FIX = "restore it from a copy (the COMPLETE record of each of the run's checkpoints holds the same config)"
TEST_EVALUATION = "test"  # RUN/eval/test: a sweep's evaluation of each run


class _Inside:
    """A fixed path inside the run folder, read as an attribute (`folder.metrics_file`)."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, folder: RunFolder | None, owner: type) -> Path:
        return self if folder is None else folder.path / self.name


@dataclass(frozen=True)
class RunFolder:
    path: Path

    # The fixed names of a run folder (see the module's docstring).
    config_file = _Inside("config.yaml")
    record_file = _Inside("run.json")
    metrics_file = _Inside("metrics.jsonl")
    curves_file = _Inside("curves.png")
    lock_file = _Inside(".lock")
    tensorboard = _Inside("tensorboard")
    evaluations_dir = _Inside("eval")
    predictions_dir = _Inside("predictions")
    slurm_logs = _Inside("slurm")
    sweep_log = _Inside("sweep.log")
    sweep_status_file = _Inside("sweep-status.json")

    def __post_init__(self) -> None:  # any path, or a RunFolder
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:  # a RunFolder goes wherever a path does (open, Path, shutil)
        return str(self.path)

    @classmethod
    def new(cls, dataset: str, root: Path = RUNS_ROOT) -> RunFolder:
        """A new run's folder: runs/<dataset>-<date>-<time>."""
        return cls(Path(root) / f"{dataset}-{time.strftime('%Y%m%d-%H%M%S')}")

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoints(self) -> Path:
        from ..checkpoint import checkpoint_root  # the checkpoint package owns the names inside it

        return checkpoint_root(self.path)

    @property
    def staging(self) -> Path:
        """A hidden folder beside this one where a whole run is assembled, then renamed into place."""
        return self.path.with_name(f".{self.name}.importing")

    # --- evaluations and predictions --------------------------------------------------------------------
    def evaluation(self, name: str) -> Path:
        return self.evaluations_dir / name

    def default_evaluation(self, split: str, checkpoint: str, sampler: str, steps: int) -> Path:
        """Where `diffmic eval` writes without --out: RUN/eval/<split>-<checkpoint>-<sampler><steps>."""
        return self.evaluation(f"{split}-{checkpoint}-{sampler}{steps}")

    @property
    def test_evaluation(self) -> Path:
        return self.evaluation(TEST_EVALUATION)

    def evaluations(self) -> list[Path]:
        """The metrics.json of every evaluation of this run."""
        return sorted(self.evaluations_dir.glob("*/metrics.json"))

    def predictions_file(self) -> Path:
        return self.predictions_dir / f"{time.strftime('%Y%m%d-%H%M%S')}.csv"

    def job_file(self, kind: str) -> Path:
        """RUN/slurm_train.json or RUN/slurm_eval.json: the submitted job, for `diffmic status`."""
        return self.path / f"slurm_{kind}.json"

    # --- the record -------------------------------------------------------------------------------------
    def write_record(self, config: Config, provenance: dict, facts: dict, session: dict) -> None:
        """config.yaml and run.json. run.json says what this session runs (provenance, facts) and keeps the history
        of every session (how each started: fresh, resumed, fine-tuned, imported; the settings it changed)."""
        self.path.mkdir(parents=True, exist_ok=True)
        previous = self.read_record()
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        # A launched process (a Slurm task, one of N local ones) is told the user's command among the facts.
        facts = dict(facts)
        session = {"started": started, "command": facts.pop("command", None) or " ".join(sys.argv), **session}
        run = {**provenance, **facts, "command": session["command"], "started": previous.get("started", started),
               "sessions": previous.get("sessions", []) + [session]}
        began = previous.get("fine_tuned_from") or session.get("fine_tuned_from")
        if began:  # how the run began stays recorded for its whole life
            run["fine_tuned_from"] = began
        write_text_atomic(self.config_file, sealed_text(dump_config(config)))
        write_sealed_json(self.record_file, run)

    def read_record(self) -> dict:
        """run.json ({} before the first session); RunFileError naming it when it is damaged, so that the run's
        history is never silently replaced."""
        try:
            values = read_sealed_json(self.record_file, RECORD_FIX)
        except FileNotFoundError:
            return {}
        if not isinstance(values.get("sessions", []), list):
            raise RunFileError(f"{self.record_file} is damaged (its 'sessions' is not a list); {RECORD_FIX}")
        return values

    def read_config_text(self) -> str:
        """config.yaml's YAML, its checksum checked; RunFileError naming it when it is damaged."""
        return read_sealed_text(self.config_file, CONFIG_FIX)


def git_commit() -> str:
    """The commit of the diffmic checkout in use, with '+dirty' for uncommitted changes; 'unknown'
    for an installed copy outside git."""
    source = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(manifest=None, **data) -> dict:
    """Where a run's weights come from: the code and the data (a shard manifest, else `data`: the classes and
    whatever else is known). Recorded in run.json and every checkpoint."""
    if manifest is not None:
        data = {"shards": str(manifest.folder), "manifest_sha256": manifest.digest,
                "classes": list(manifest.classes), **data}
    return {"git_commit": git_commit(), "diffmic_version": __version__, **data}
