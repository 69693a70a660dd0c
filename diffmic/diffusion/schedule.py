"""The CARD-style noise schedule with a prior mean: buffers and closed forms, no network.

q(y_t | y_0, p) = N(sqrt(abar_t) y_0 + (1 - sqrt(abar_t)) p, (1 - abar_t) I), where p is the prior
(the guidance model's class probabilities). Diffusion time t runs over 0..T with t = 0 the clean
label; the arrays hold steps t = 1..T at positions 0..T-1 (the authors' code passes the position to
the denoiser, we pass t: the same network up to relabelling of its timestep embedding's T + 1 rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    """Per-step coefficients of a (possibly respaced) chain, float64 on the CPU.

    `timesteps[i]` is the diffusion time (1..T of the training chain) of position i, which the
    denoiser sees; for the full schedule it is i + 1, for a respaced one the step it stands for.
    """

    betas: torch.Tensor
    timesteps: torch.Tensor
    _on_device: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.betas.ndim != 1 or self.betas.shape != self.timesteps.shape:
            raise ValueError("betas and timesteps must be 1-D tensors of the same length")
        if not bool(((self.betas > 0) & (self.betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1)")

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def linear(cls, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        return cls(betas, torch.arange(1, timesteps + 1))

    def respaced(self, steps: int) -> "NoiseSchedule":
        """`steps` indices spread evenly over the whole chain, with betas recomputed so that the
        cumulative alphas at the kept indices are unchanged (improved-DDPM respacing)."""
        if not 1 <= steps <= len(self):
            raise ValueError(f"steps must be in 1..{len(self)}, got {steps}")
        keep = torch.linspace(0, len(self) - 1, steps, dtype=torch.float64).round().long().unique()
        abar = self.alphas_cumprod[keep]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return NoiseSchedule(1 - abar / abar_prev, self.timesteps[keep])

    def truncated(self, steps: int) -> "NoiseSchedule":
        """The first `steps` entries of the chain: the authors' test-time shortcut, which starts the
        reverse process at t = steps - 1 as if it were t = T."""
        if not 1 <= steps <= len(self):
            raise ValueError(f"steps must be in 1..{len(self)}, got {steps}")
        return NoiseSchedule(self.betas[:steps], self.timesteps[:steps])

    # --- derived arrays -----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas(self) -> torch.Tensor:
        return 1 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, dim=0)

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        return torch.cat([torch.ones(1, dtype=self.betas.dtype), self.alphas_cumprod[:-1]])

    def posterior_coefficients(self) -> dict[str, torch.Tensor]:
        """g0, g1, g2 of y_{t-1} = g0 y0_hat + g1 y_t + g2 p + sqrt(beta_tilde) z, and beta_tilde."""
        beta, alpha = self.betas, self.alphas
        abar, abar_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        one_minus_abar = 1 - abar
        return {
            "g0": beta * abar_prev.sqrt() / one_minus_abar,
            "g1": (1 - abar_prev) * alpha.sqrt() / one_minus_abar,
            "g2": 1 + (abar.sqrt() - 1) * (alpha.sqrt() + abar_prev.sqrt()) / one_minus_abar,
            "beta_tilde": (1 - abar_prev) / one_minus_abar * beta,
        }

    # --- forward process ----------------------------------------------------------------------
    def q_sample(self, y0: torch.Tensor, prior: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
        """y_t for each row at step `t` (B,) in 0..len (0 returns y0), with the given Gaussian noise."""
        sqrt_abar, sqrt_one_minus = self._forward_coefficients(y0.device, y0.dtype)
        sqrt_abar, sqrt_one_minus = sqrt_abar[t].unsqueeze(-1), sqrt_one_minus[t].unsqueeze(-1)
        return sqrt_abar * y0 + (1 - sqrt_abar) * prior + sqrt_one_minus * noise

    def _forward_coefficients(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Copied to each device once: the training step must not upload them every call.
        key = (str(device), dtype)
        if key not in self._on_device:
            abar = torch.cat([torch.ones(1, dtype=self.betas.dtype), self.alphas_cumprod])  # t = 0 is clean
            self._on_device[key] = (abar.sqrt().to(device, dtype), (1 - abar).sqrt().to(device, dtype))
        return self._on_device[key]


def antithetic_timesteps(batch_size: int, timesteps: int, device: torch.device | str = "cpu",
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """One t in 1..T per sample, drawn in antithetic pairs (t, T + 1 - t) to lower the loss's variance."""
    half = torch.randint(1, timesteps + 1, (batch_size // 2 + 1,), generator=generator, device=device)
    return torch.cat([half, timesteps + 1 - half])[:batch_size]
