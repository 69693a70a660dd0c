"""The one progress bar of diffmic (rich): training, evaluation, sharding and verifying all draw with it.

A disabled bar (other ranks, --no-progress) accepts the same calls and draws nothing, so callers never
branch on it. Imports only rich.
"""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressBar:
    """`with ProgressBar("eval") as bar: ... bar.advance(n)`; `total=None` until the total is known."""

    def __init__(self, label: str, total: int | None = None, completed: int = 0, enabled: bool = True,
                 transient: bool = True, console=None):
        self.label, self.total, self.completed = label, total, completed
        self.enabled, self.transient, self.console = enabled, transient, console
        self.bar: Progress | None = None

    def __enter__(self) -> "ProgressBar":
        if self.enabled:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                                transient=self.transient, console=self.console)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=self.total, completed=self.completed, status="")
        return self

    def update(self, completed: int | None = None, total: int | None = None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, total=total)

    def advance(self, count: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, count)

    def report(self, done: int, total: int | None) -> None:
        """The `progress(done, total)` callback of the data tools."""
        self.update(completed=done, total=total)

    def status(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, status=text)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
            self.bar = None
