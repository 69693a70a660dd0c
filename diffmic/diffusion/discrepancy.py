"""Maximum mean discrepancy between two batches, the regulariser of the global and local branches."""

from __future__ import annotations

import torch


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """k(a, b) = exp(-||a - b||^2 / C^2) for every pair of rows; C^2 is the authors' bandwidth."""
    # Explicit differences, not cdist: its gradient is undefined at zero distance (the diagonal).
    squared_distance = (a.unsqueeze(-2) - b.unsqueeze(-3)).square().sum(-1)
    return torch.exp(-squared_distance / a.shape[-1] ** 2)


def mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased MMD^2 estimate between the distributions behind batches x and y (N, C); it compares
    distributions, not pairs, so shuffling either batch leaves it unchanged.

    Leading dimensions (G, N, C) are independent groups, and the result is the mean over groups: the
    cost stays G * N^2 instead of (G * N)^2 when training draws several noises per image.
    """
    if x.ndim < 2 or x.shape[:-2] != y.shape[:-2] or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"mmd expects two (..., N, C) batches with equal groups and C, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    x, y = x.float(), y.float()
    per_group = (gaussian_kernel(x, x).mean((-2, -1)) + gaussian_kernel(y, y).mean((-2, -1))
                 - 2 * gaussian_kernel(x, y).mean((-2, -1)))
    return per_group.mean()
