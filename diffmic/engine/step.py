"""One training step and the running loss sums between two log lines.

Each step is one micro-batch: forward, backward and, at the end of an accumulation group, the learning
rates, clipping and one step of the single Adam (denoiser group + guidance group). The denoiser loss cannot
reach the DCG and the cross-entropy cannot reach the denoiser, so the two updates stay separate with their
own learning rates and clipping. Nothing here reads a value back to the host: `LossMeter.flush` at logging
steps is the one place the loop synchronises.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..config import TrainConfig
from .optim import clip_group_gradients, set_learning_rates

LOSS_KEYS = ("loss", "denoiser_loss", "mse", "mmd", "dcg_loss")
NEVER = float(2**62)  # "no non-finite loss yet", as a step number every process can take the minimum of


class TrainStep:
    """`step(batch, joint, joint_epochs) -> losses`: one micro-batch of training (detached losses)."""

    def __init__(self, accelerator, model, module, optimizer, train: TrainConfig):
        self.accelerator, self.model, self.module, self.optimizer, self.train = accelerator, model, module, optimizer, train
        self.deepspeed = accelerator.distributed_type.value == "DEEPSPEED"

    def __call__(self, batch: dict, joint: bool, joint_epochs: float) -> dict[str, torch.Tensor]:
        """`joint`: the denoiser trains too (after the DCG warm-up); `joint_epochs`: joint training's
        progress in epochs, for the denoiser's learning-rate schedule."""
        acc = self.accelerator
        batch = {"image": batch["image"].to(acc.device, non_blocking=True),
                 "label": batch["label"].to(acc.device, non_blocking=True), "key": batch["key"]}
        with acc.accumulate(self.model):
            losses = self.model(batch, train_denoiser=joint and self.module.denoiser is not None)
            acc.backward(losses["loss"])  # Accelerate divides by the accumulation steps
            if acc.sync_gradients:
                set_learning_rates(self.optimizer, self.train, joint_epochs if joint else -1.0)
                if not self.deepspeed:  # DeepSpeed clips inside its step
                    acc.unscale_gradients()
                    clip_group_gradients(self.optimizer)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {key: value.detach() for key, value in losses.items()}

    @property
    def stepped(self) -> bool:
        """Whether the last call ended an accumulation group (an optimizer step)."""
        return self.accelerator.sync_gradients


@dataclass
class Interval:
    """What `LossMeter.flush` agreed on across processes."""

    means: dict[str, float]
    images_per_s: float
    stop: bool  # a process was asked to stop (SIGTERM / SIGUSR2)
    save_due: bool  # a process's clock says a timed checkpoint is due


class LossMeter:
    """Device-side sums of the losses since the last flush, the first step whose loss was not finite, and
    the number of micro-batches and images summed (a resumed interval is shorter than log_every)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(len(LOSS_KEYS), device=device)
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
        self.batches, self.images, self.started = 0, 0, time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], step: int, images: int) -> None:
        """`step`: the optimizer step this micro-batch belongs to (named if its loss is not finite)."""
        zero = losses["loss"].new_zeros(())
        self.sums += torch.stack([losses.get(key, zero).float() for key in LOSS_KEYS])
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(losses["loss"]),
                                     torch.full_like(self.first_bad, step), self.first_bad)
        self.batches += 1
        self.images += images

    def flush(self, accelerator, stop: bool, save_due: bool) -> tuple[Interval, int | None]:
        """Reads the interval back (a collective when there are several processes) and starts a new one.
        Returns the agreed interval and the first non-finite step of any process (None if all finite)."""
        flags = torch.tensor([NEVER, float(stop), float(save_due)], device=self.device, dtype=torch.float64)
        flags[0] = torch.where(self.first_bad >= 0, self.first_bad.double(), flags[0])
        reduced = accelerator.reduce(self.sums.clone(), reduction="mean")
        if accelerator.num_processes > 1:  # the earliest NaN of any process; any process's stop or save
            every = accelerator.gather(flags.unsqueeze(0))
            flags = torch.stack([every[:, 0].min(), every[:, 1].max(), every[:, 2].max()])
        bad_step, stop_requested, save_requested = flags.tolist()
        means = (reduced / max(self.batches, 1)).tolist()
        seconds = max(time.perf_counter() - self.started, 1e-9)
        interval = Interval({key: value for key, value in zip(LOSS_KEYS, means) if value or key == "loss"},
                            self.images * accelerator.num_processes / seconds, bool(stop_requested),
                            bool(save_requested))
        self.sums.zero_()
        self.batches, self.images, self.started = 0, 0, time.perf_counter()
        return interval, (int(bad_step) if bad_step < NEVER and math.isfinite(bad_step) else None)
