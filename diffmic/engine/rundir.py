"""The run folder: resolved config, provenance (git commit, shard manifest hash) and metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .. import __version__
from ..config import Config, dump_config, flatten
from ..fileio import write_text_atomic


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


def provenance(manifest) -> dict:
    """Where a run's weights come from: the code and the data. Recorded in run.json and every checkpoint."""
    return {"git_commit": git_commit(), "diffmic_version": __version__, "shards": str(manifest.folder),
            "manifest_sha256": manifest.digest, "classes": list(manifest.classes)}


def write_run_files(run_dir: Path, config: Config, provenance: dict, facts: dict, session: dict) -> None:
    """config.yaml and run.json of a run. run.json says what this session runs (provenance, facts) and keeps
    the history of every session (how each started: fresh, resumed, fine-tuned; the settings it changed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = _read_run_json(run_dir / "run.json")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    # A launched process (a Slurm task, one of N local ones) is told the user's command among the facts.
    facts = dict(facts)
    session = {"started": started, "command": facts.pop("command", None) or " ".join(sys.argv), **session}
    run = {**provenance, **facts, "command": session["command"], "started": previous.get("started", started),
           "sessions": previous.get("sessions", []) + [session]}
    began = previous.get("fine_tuned_from") or session.get("fine_tuned_from")
    if began:  # how the run began stays recorded for its whole life
        run["fine_tuned_from"] = began
    write_text_atomic(run_dir / "config.yaml", dump_config(config))
    write_text_atomic(run_dir / "run.json", json.dumps(run, indent=2))


def _read_run_json(path: Path) -> dict:
    """The previous sessions' record; an unreadable one only loses the history, never the run."""
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


class MetricsLog:
    """Appends one JSON object per line to RUN/metrics.jsonl and sends its numbers to the experiment trackers
    of `accelerator` (train.log_with) at the row's step; rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, accelerator=None):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.accelerator = accelerator  # its trackers start in the trainer's prepare_run

    def cut_after(self, step: int) -> int:
        """Drops the rows logged after `step` (the checkpoint a run resumes from) by an earlier session that
        went on past it, so the resumed rows do not appear twice; rewritten atomically. Returns how many."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
                keep = int(row["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep = False  # a line cut short by a kill
            if keep:
                kept.append(line)
            dropped += not keep
        if dropped:
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        return dropped

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.accelerator is not None:
            numbers = {key: value for key, value in row.items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"}
            self.accelerator.log(numbers, step=row["step"])

    def close(self) -> None:
        """Nothing to close: the trackers end with the Accelerator (`end_training`)."""


def tracker_parameters(config: Config, provenance: dict, facts: dict) -> dict:
    """The run's hyper-parameters for the trackers: every config key (dotted; lists as text, which every
    tracker accepts), its provenance (commit, shards, manifest hash) and the caller's facts."""
    extra = {key: value for key, value in {**provenance, **facts}.items() if key != "classes"}
    flat = {**flatten(config.to_dict()), **flatten(extra, "run.")}
    return {**{key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in flat.items()},
            "run.classes": ",".join(provenance["classes"])}


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of RUN/metrics.jsonl. A run that is still writing may end in a half-written line: it is
    left out (it is complete on the next read)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
