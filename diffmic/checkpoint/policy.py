"""When the trainer saves: `train.checkpoint_every` in epochs, optimizer steps or wall-clock minutes.

A pure decision (no I/O), so it is tested on its own. Epoch and step intervals give the same answer on
every process by themselves; a time interval is read from each process's clock, so the trainer asks it only
at logging steps, where the processes already agree on the stop flag, and saves when any process says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config import parse_interval


@dataclass
class CheckpointPolicy:
    count: int
    unit: str  # "epoch", "step" or "minute"
    clock: Callable[[], float] = time.monotonic
    last_save: float = 0.0

    @classmethod
    def from_setting(cls, value: int | str, clock=time.monotonic) -> "CheckpointPolicy":
        count, unit = parse_interval(value)
        return cls(count, unit, clock, clock())

    def saved(self) -> None:
        """Restarts the time interval (called after every save, whatever caused it)."""
        self.last_save = self.clock()

    def due_after_step(self, step: int) -> bool:
        return self.unit == "step" and step % self.count == 0

    def due_by_time(self) -> bool:
        return self.unit == "minute" and self.clock() - self.last_save >= 60 * self.count

    def due_after_epoch(self, epochs_done: int, last_epoch: bool) -> bool:
        """The last epoch always saves (the run's final state); otherwise every `count` epochs."""
        return last_epoch or (self.unit == "epoch" and epochs_done % self.count == 0)

    def describe(self) -> str:
        return f"every {self.count} {self.unit}{'s' if self.count != 1 else ''}"
