"""The dual-granularity conditional guidance (DCG) model, tau_D.

Global stream: a ResNet trunk and a 1x1 convolution give one saliency map per class; pooling its
top t% cells gives the global logits y_g. ROI selection picks the K most salient cells of the
summed, min-max normalised maps; their 32x32 tiles are cut from the input with one gather and
encoded by a second trunk, and gated-attention MIL pools them into the local logits y_l.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CELL_SIZE
from .backbones import ResNetTrunk


@dataclass
class GuidanceLogits:
    """What the guidance model says about a batch: fused logits always, the two streams for the DCG."""

    fused: torch.Tensor
    global_: torch.Tensor | None = None
    local: torch.Tensor | None = None
    saliency: torch.Tensor | None = None  # (B, C, h, w)
    roi_cells: torch.Tensor | None = None  # (B, K) row-major cell indices
    attention: torch.Tensor | None = None  # (B, K), sums to 1


def top_t_pool(saliency: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the largest `fraction` of each class map's cells: (B, C, h, w) -> (B, C)."""
    cells = saliency.flatten(2)
    count = max(1, int(round(cells.shape[-1] * fraction)))
    if count == cells.shape[-1]:
        return cells.mean(dim=-1)
    return cells.topk(count, dim=-1).values.mean(dim=-1)


def select_roi_cells(saliency: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, K) of the K cells with the highest sum of min-max normalised class maps.

    A constant class map contributes zeros instead of dividing by zero; ties go to the earlier cell
    in row-major order (a stable sort), so the choice is deterministic.
    """
    cells = saliency.detach().flatten(2).float()
    low = cells.min(dim=-1, keepdim=True).values
    span = cells.max(dim=-1, keepdim=True).values - low
    normalised = torch.where(span > 0, (cells - low) / span.clamp_min(torch.finfo(cells.dtype).tiny), 0.0)
    score = normalised.sum(dim=1)
    if k > score.shape[-1]:
        raise ValueError(f"cannot select {k} ROI cells from a map with {score.shape[-1]} cells")
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]


def crop_tiles(images: torch.Tensor, cells: torch.Tensor, channels: str = "all",
               tile: int = CELL_SIZE) -> torch.Tensor:
    """Cuts the tile of every selected cell: images (B, 3, H, W), cells (B, K) -> (B, K, 3, tile, tile).

    The image is viewed as a grid of tiles and indexed once with (batch, row, column) tensors: one
    gather on the device, no loop over images or crops. `channels='first'` replicates channel 0 (the
    authors' code, inherited from a single-channel mammography model).
    """
    batch, depth, height, width = images.shape
    rows, cols = height // tile, width // tile
    grid = images.view(batch, depth, rows, tile, cols, tile)
    batch_index = torch.arange(batch, device=images.device).unsqueeze(1)
    # Advanced indices separated by slices move to the front: (B, K, depth, tile, tile).
    tiles = grid[batch_index, :, cells // cols, :, cells % cols, :]
    if channels == "first":
        tiles = tiles[:, :, :1].expand(-1, -1, depth, -1, -1)
    return tiles


class GatedAttentionMIL(nn.Module):
    """Ilse et al. (2018): a_k = softmax_k(w^T [sigmoid(U h_k) * tanh(V h_k)]), z = sum_k a_k h_k."""

    def __init__(self, features: int, hidden: int, num_classes: int):
        super().__init__()
        self.gate = nn.Linear(features, hidden, bias=False)  # U
        self.value = nn.Linear(features, hidden, bias=False)  # V
        self.score = nn.Linear(hidden, 1, bias=False)  # w
        self.classifier = nn.Linear(features, num_classes, bias=False)

    def forward(self, instances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """instances (B, K, D) -> logits (B, C), attention (B, K)."""
        hidden = torch.sigmoid(self.gate(instances)) * torch.tanh(self.value(instances))
        attention = F.softmax(self.score(hidden).squeeze(-1), dim=-1)
        pooled = torch.einsum("bk,bkd->bd", attention, instances)
        return self.classifier(pooled), attention


class DCG(nn.Module):
    def __init__(self, num_classes: int, backbone: str = "resnet50", local_backbone: str = "resnet50",
                 k: int = 6, top_t: float = 1.0, crop_channels: str = "all", attention_dim: int = 128,
                 pretrained: str = ""):
        super().__init__()
        self.k, self.top_t, self.crop_channels = k, top_t, crop_channels
        self.global_trunk = ResNetTrunk(backbone, pretrained)
        self.saliency_head = nn.Conv2d(self.global_trunk.channels, num_classes, kernel_size=1, bias=False)
        self.local_trunk = ResNetTrunk(local_backbone, pretrained)
        self.mil = GatedAttentionMIL(self.local_trunk.channels, attention_dim, num_classes)

    def forward(self, images: torch.Tensor) -> GuidanceLogits:
        saliency = self.saliency_head(self.global_trunk(images))
        global_logits = top_t_pool(saliency, self.top_t)
        cells = select_roi_cells(saliency, self.k)
        tiles = crop_tiles(images, cells, self.crop_channels)
        batch, k = cells.shape
        instances = self.local_trunk(tiles.reshape(batch * k, *tiles.shape[2:])).mean(dim=(2, 3))
        local_logits, attention = self.mil(instances.view(batch, k, -1))
        fused = (global_logits + local_logits) / 2
        return GuidanceLogits(fused, global_logits, local_logits, saliency, cells, attention)
