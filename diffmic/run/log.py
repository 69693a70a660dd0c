"""A run's log: RUN/metrics.jsonl, one JSON row per logging interval and per validation, and the same numbers
sent to the experiment trackers (train.log_with)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config, flatten
from ..fileio import write_text_atomic
from .folder import RunFolder


class MetricsLog:
    """Appends one JSON object per line to RUN/metrics.jsonl and sends its numbers to the experiment trackers
    of `accelerator` (train.log_with) at the row's step; rank 0 only."""

    def __init__(self, run_dir: Path | RunFolder, enabled: bool, accelerator=None):
        self.path = RunFolder(run_dir).metrics_file
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


def read_metrics(run_dir: Path | RunFolder) -> list[dict]:
    """The rows of RUN/metrics.jsonl. A run that is still writing may end in a half-written line: it is
    left out (it is complete on the next read)."""
    path = RunFolder(run_dir).metrics_file
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
