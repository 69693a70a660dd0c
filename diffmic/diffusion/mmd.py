"""Maximum mean discrepancy between two batches, the regulariser of the global and local branches."""

from __future__ import annotations

import torch


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """k(a, b) = exp(-||a - b||^2 / C^2) for every pair of rows; C^2 is the authors' bandwidth."""
    # Explicit differences, not cdist: its gradient is undefined at zero distance (the diagonal).
    squared_distance = (a.unsqueeze(1) - b.unsqueeze(0)).square().sum(-1)
    return torch.exp(-squared_distance / a.shape[-1] ** 2)


def mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased MMD^2 estimate between the distributions behind batches x and y (N, C); it compares
    distributions, not pairs, so shuffling either batch leaves it unchanged."""
    if x.ndim != 2 or x.shape[1:] != y.shape[1:]:
        raise ValueError(f"mmd expects two (N, C) batches with equal C, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.float(), y.float()
    return gaussian_kernel(x, x).mean() + gaussian_kernel(y, y).mean() - 2 * gaussian_kernel(x, y).mean()
