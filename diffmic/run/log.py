"""A run's log: RUN/metrics.jsonl, one JSON row per logging interval and per validation, and the same numbers
sent to the experiment trackers (train.log_with).

Each row carries its checksum (diffmic.fileio.sealed_line). Only the last line may be incomplete (a training writing
it, or killed while it wrote): it is left out. Any other damaged line is refused with its number, so that a curve,
a status or a resume never rests on a row that changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..config import Config, flatten
from ..errors import RunFileError
from ..fileio import append_text, open_for_append, sealed_line, unsealed, write_text_atomic
from .folder import RunFolder

LOG_FIX = "delete that line (or restore the file from a copy) and run the command again"


class MetricsLog:
    """Appends one JSON object per line to RUN/metrics.jsonl and sends its numbers to the experiment trackers
    of `accelerator` (train.log_with) at the row's step; rank 0 only."""

    def __init__(self, run_dir: Path | RunFolder, enabled: bool, accelerator=None):
        self.path = RunFolder(run_dir).metrics_file
        self.enabled = enabled
        self.accelerator = accelerator  # its trackers start in the trainer's prepare_run

    def check(self) -> None:
        """Before a session writes anything: the log reads (every complete row is intact) and is a file of the run
        folder, not a link that would make the appends land outside it."""
        if not self.enabled:
            return
        if self.path.is_symlink() or self.path.is_file():
            open_for_append(self.path).close()  # refuses a link
            read_rows(self.path)

    def cut_after(self, step: int) -> int:
        """Drops the rows logged after `step` (the checkpoint a run resumes from) by an earlier session that
        went on past it, and a last line cut short by a kill, so the resumed rows do not appear twice; rewritten
        atomically. Returns how many."""
        if not self.enabled or not self.path.is_file():
            return 0
        rows, complete = read_rows(self.path, with_tail=True)
        kept = [row for row in rows if row["step"] <= step]
        dropped = len(rows) - len(kept) + (not complete)
        if dropped:
            write_text_atomic(self.path, "".join(sealed_line(row) for row in kept))
        return dropped

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        append_text(self.path, sealed_line(row))
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


def read_metrics(run_dir: Path | RunFolder, warn: Callable[[str], None] | None = None) -> list[dict]:
    """The rows of RUN/metrics.jsonl ([] before the first); RunFileError naming the file and line for a damaged one.
    A run that is still writing may end in a half-written line: it is left out (complete on the next read), and
    said through `warn`, since a truncated file looks the same and its rows are then not the latest."""
    path = RunFolder(run_dir).metrics_file
    if not path.is_file():
        return []
    rows, complete = read_rows(path, with_tail=True)
    if not complete and warn is not None:
        warn(f"{path} line {len(rows) + 1} is incomplete (a training writing it now, or a truncated file): the rows "
             f"before it are shown")
    return rows


def read_rows(path: Path, with_tail: bool = False):
    """The rows of a metrics.jsonl, each checked; with `with_tail`, (rows, whether the last line was complete)."""
    *lines, tail = path.read_bytes().split(b"\n")  # a file that ends in a newline has an empty tail
    rows = [_row(line, path, number) for number, line in enumerate(lines, start=1)]
    return (rows, not tail) if with_tail else rows


def _row(line: bytes, path: Path, number: int) -> dict:
    where = f"{path} line {number}"
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise RunFileError(f"{where} is damaged (it is not UTF-8 text); {LOG_FIX}") from None
    except json.JSONDecodeError as error:
        raise RunFileError(f"{where} is damaged (it is not valid JSON: {error.msg}); {LOG_FIX}") from None
    if not isinstance(row, dict):
        raise RunFileError(f"{where} is damaged (it is not a JSON object); {LOG_FIX}")
    row = unsealed(row, where, LOG_FIX)
    if not isinstance(row.get("step"), int) or isinstance(row["step"], bool):
        raise RunFileError(f"{where} is damaged (it has no integer 'step'); {LOG_FIX}")
    return row
