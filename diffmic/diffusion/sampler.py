"""Reverse diffusion from y_T = p + N(0, I) to y_0, as a plain function of a denoising callable.

The callable sees only (y_t, t) and closes over everything that does not change with the step (the
image features rho(x), the priors), so the image encoder and the guidance model run once per image
whatever the number of steps. Coefficients are moved to the device once; the loop indexes them with
Python ints, so no step waits on the host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # torch is imported on first use: the config reads SAMPLERS without it
    import torch

    from .schedule import NoiseSchedule

Denoise = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
SAMPLERS = ("respaced", "truncated", "ddim")


def sampling_schedule(schedule: NoiseSchedule, sampler: str, steps: int) -> NoiseSchedule:
    if sampler in ("respaced", "ddim"):
        return schedule.respaced(steps)
    if sampler == "truncated":
        return schedule.truncated(steps)
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")


# Columns of `step_coefficients`: y0_hat = (y_t - (1 - sqrt_abar) p - sqrt_one_minus_abar eps) / sqrt_abar, then
# y_next = a y0_hat + b y_t + c p + d eps + sigma z. One formula serves every sampler and the last step (a = 1,
# the rest 0: y_0 = y0_hat), so a step has no branch and compiles to one graph whatever its position.
STEP_COLUMNS = ("sqrt_abar", "sqrt_one_minus_abar", "a", "b", "c", "d", "sigma")
Step = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]


def step_coefficients(chain: NoiseSchedule, deterministic: bool) -> torch.Tensor:
    """(len(chain), len(STEP_COLUMNS)) float64: row i holds the coefficients of the reverse step from position i."""
    import torch

    abar, abar_prev = chain.alphas_cumprod, chain.alphas_cumprod_prev
    zero, one = torch.zeros_like(abar), torch.ones_like(abar)
    if deterministic:  # DDIM, eta = 0
        update = (abar_prev.sqrt(), zero, 1 - abar_prev.sqrt(), (1 - abar_prev).sqrt(), zero)
    else:  # the posterior q(y_{t-1} | y_t, y0_hat) of the paper
        posterior = chain.posterior_coefficients()
        update = (posterior["g0"], posterior["g1"], posterior["g2"], zero, posterior["beta_tilde"].sqrt())
    rows = torch.stack([abar.sqrt(), (1 - abar).sqrt(), *update], dim=1)
    rows[0, 2:] = torch.stack([one[0], *[zero[0]] * 4])  # the last step returns y0_hat itself
    return rows


def reverse_step(y: torch.Tensor, prior: torch.Tensor, eps_hat: torch.Tensor, coefficients: torch.Tensor,
                 z: torch.Tensor) -> torch.Tensor:
    """y_{t-1} from y_t (N, C), the denoiser's eps_hat and one row of `step_coefficients` (on y's device)."""
    sqrt_abar, sqrt_one_minus_abar, a, b, c, d, sigma = coefficients.unbind()
    y0_hat = (y - (1 - sqrt_abar) * prior - sqrt_one_minus_abar * eps_hat) / sqrt_abar
    return a * y0_hat + b * y + c * prior + d * eps_hat + sigma * z


def sample(denoise: Denoise | None, prior: torch.Tensor, schedule: NoiseSchedule, sampler: str, steps: int,
           noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
           record_every: int = 0, step: Step | None = None) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """Runs one chain per row of `prior` (N, C) with `sampler` (one of SAMPLERS) over `steps` and returns y_0
    (N, C) and, if `record_every` > 0, the trajectory as (training timestep, y_t) pairs (y_T first, y_0 last,
    every k-th step between). The caller has already repeated each image's row once per chain.

    `noise`, when given, is (S + 1, N, C) standard normals: slot 0 starts the chain, slot i is used
    by the i-th reverse step. It lets a caller fix each sample's noise independently of batching.
    `step(y_t, t, coefficients, z)`, when given, replaces `reverse_step(y_t, prior, denoise(y_t, t), ...)`
    with the same computation in one piece (a compiled one: diffmic.models.diffmic); `denoise` is then unused.
    """
    import torch

    chain = sampling_schedule(schedule, sampler, steps)
    length, (rows, classes) = len(chain), prior.shape
    if noise is not None and noise.shape != (length + 1, rows, classes):
        raise ValueError(f"noise must have shape {(length + 1, rows, classes)}, got {tuple(noise.shape)}")

    def draw(slot: int) -> torch.Tensor:
        if noise is not None:
            return noise[slot]
        return torch.randn(prior.shape, generator=generator, device=prior.device, dtype=prior.dtype)

    if step is None:
        step = lambda y_t, t, row, z: reverse_step(y_t, prior, denoise(y_t, t), row, z)  # noqa: E731
    deterministic = sampler == "ddim"
    coefficients = step_coefficients(chain, deterministic).to(prior.device, prior.dtype)
    timesteps = chain.timesteps.to(prior.device)
    silent = torch.zeros_like(prior)  # the z of the steps that add no noise

    y = prior + draw(0)
    trajectory = [(int(chain.timesteps[-1]), y)] if record_every else []
    for position, index in enumerate(range(length - 1, -1, -1), start=1):
        z = silent if deterministic or index == 0 else draw(position)
        y = step(y, timesteps[index].expand(rows), coefficients[index], z)
        if record_every and (position % record_every == 0 or index == 0):
            # The new state sits at the previous position's time; after position 0 it is y_0.
            trajectory.append((int(chain.timesteps[index - 1]) if index else 0, y))
    return y, trajectory
