"""Reverse diffusion from y_T = p + N(0, I) to y_0, as a plain function of a denoising callable.

The callable sees only (y_t, t) and closes over everything that does not change with the step (the
image features rho(x), the priors), so the image encoder and the guidance model run once per image
whatever the number of steps. Coefficients are moved to the device once; the loop indexes them with
Python ints, so no step waits on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # torch is imported on first use: the config reads SAMPLERS without it
    import torch

    from .schedule import NoiseSchedule

Denoise = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
SAMPLERS = ("respaced", "truncated", "ddim")
# How the chains' final states y_0 become class probabilities (diffmic.models.diffmic.chain_probabilities):
# the normalised positive part of their mean, the softmax of their mean, or the share of chains voting each class.
PROBABILITY_RULES = ("positive_part", "softmax", "vote")


@dataclass(frozen=True)
class SamplingSettings:
    """How one prediction is sampled, passed whole from the evaluator to `sample`. No defaults here: the
    config's `eval` section owns them (diffmic.evaluation.settings resolves them against the command line)."""

    sampler: str  # one of SAMPLERS
    steps: int  # reverse steps of the chain
    n_samples: int  # chains per image
    aggregate: str  # how an image's chains combine: "mean" of their states or a majority "vote"
    probability: str  # one of PROBABILITY_RULES: how the (mean) final state becomes probabilities

    def __post_init__(self) -> None:
        if self.probability not in PROBABILITY_RULES:
            raise ValueError(f"unknown probability rule {self.probability!r}; expected one of "
                             f"{', '.join(PROBABILITY_RULES)}")

    @property
    def rule(self) -> str:
        """The probability rule in force: a majority vote over the chains makes them the vote shares."""
        return "vote" if self.aggregate == "vote" else self.probability


def sampling_schedule(schedule: NoiseSchedule, sampler: str, steps: int) -> NoiseSchedule:
    if sampler in ("respaced", "ddim"):
        return schedule.respaced(steps)
    if sampler == "truncated":
        return schedule.truncated(steps)
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")


def sample(denoise: Denoise, prior: torch.Tensor, schedule: NoiseSchedule, settings: SamplingSettings,
           noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
           record_every: int = 0) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """Runs one chain per row of `prior` (N, C) with `settings.sampler` over `settings.steps` and returns y_0
    (N, C) and, if `record_every` > 0, the trajectory as (training timestep, y_t) pairs (y_T first, y_0 last,
    every k-th step between). The caller has already repeated each image's row once per chain.

    `noise`, when given, is (S + 1, N, C) standard normals: slot 0 starts the chain, slot i is used
    by the i-th reverse step. It lets a caller fix each sample's noise independently of batching.
    """
    import torch

    chain = sampling_schedule(schedule, settings.sampler, settings.steps)
    length, (rows, classes) = len(chain), prior.shape
    if noise is not None and noise.shape != (length + 1, rows, classes):
        raise ValueError(f"noise must have shape {(length + 1, rows, classes)}, got {tuple(noise.shape)}")

    def draw(slot: int) -> torch.Tensor:
        if noise is not None:
            return noise[slot]
        return torch.randn(prior.shape, generator=generator, device=prior.device, dtype=prior.dtype)

    device, dtype = prior.device, prior.dtype
    abar = chain.alphas_cumprod.to(device, dtype)
    abar_prev = chain.alphas_cumprod_prev.to(device, dtype)
    coefficients = {k: v.to(device, dtype) for k, v in chain.posterior_coefficients().items()}
    timesteps = chain.timesteps.to(device)
    deterministic = settings.sampler == "ddim"

    y = prior + draw(0)
    trajectory = [(int(chain.timesteps[-1]), y)] if record_every else []
    for step, index in enumerate(range(length - 1, -1, -1), start=1):
        t = timesteps[index].expand(rows)
        eps_hat = denoise(y, t)
        sqrt_abar = abar[index].sqrt()
        y0_hat = (y - (1 - sqrt_abar) * prior - (1 - abar[index]).sqrt() * eps_hat) / sqrt_abar
        if index == 0:
            y = y0_hat
        elif deterministic:
            sqrt_abar_prev = abar_prev[index].sqrt()
            y = sqrt_abar_prev * y0_hat + (1 - sqrt_abar_prev) * prior + (1 - abar_prev[index]).sqrt() * eps_hat
        else:
            mean = (coefficients["g0"][index] * y0_hat + coefficients["g1"][index] * y
                    + coefficients["g2"][index] * prior)
            y = mean + coefficients["beta_tilde"][index].sqrt() * draw(step)
        if record_every and (step % record_every == 0 or index == 0):
            # The new state sits at the previous position's time; after position 0 it is y_0.
            trajectory.append((int(chain.timesteps[index - 1]) if index else 0, y))
    return y, trajectory
