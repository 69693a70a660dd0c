"""The denoiser epsilon_theta: a timestep-conditioned MLP gated by the image feature rho(x)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import ResNetTrunk


class ConditionalLinear(nn.Module):
    """Linear(in, out) scaled elementwise by a learned per-timestep gain vector."""

    def __init__(self, in_features: int, out_features: int, timesteps: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gain = nn.Embedding(timesteps + 1, out_features)
        nn.init.uniform_(self.gain.weight, 0.0, 1.0)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.gain(t) * self.linear(x)


class ImageEncoder(nn.Module):
    """rho(x): ResNet trunk -> average pool -> Linear(channels, F) -> BatchNorm1d."""

    def __init__(self, feature_dim: int, arch: str = "resnet18", pretrained: str = ""):
        super().__init__()
        self.trunk = ResNetTrunk(arch, pretrained)
        self.project = nn.Linear(self.trunk.channels, feature_dim)
        self.norm = nn.BatchNorm1d(feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.project(self.trunk(images).mean(dim=(2, 3))))


class Denoiser(nn.Module):
    """eps_hat = eps_theta(rho(x), y_t, prior, t), with the input [y_t, prior] of the authors' code."""

    def __init__(self, num_classes: int, feature_dim: int = 6144, timesteps: int = 1000,
                 encoder: str = "resnet18", pretrained: str = ""):
        super().__init__()
        self.num_classes = num_classes
        self.encoder = ImageEncoder(feature_dim, encoder, pretrained)
        self.layer1 = ConditionalLinear(2 * num_classes, feature_dim, timesteps)
        self.norm1 = nn.BatchNorm1d(feature_dim)
        self.layer2 = ConditionalLinear(feature_dim, feature_dim, timesteps)
        self.norm2 = nn.BatchNorm1d(feature_dim)
        self.layer3 = ConditionalLinear(feature_dim, feature_dim, timesteps)
        self.norm3 = nn.BatchNorm1d(feature_dim)
        self.output = nn.Linear(feature_dim, num_classes)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """rho(x); independent of t and y_t, so callers compute it once per image."""
        return self.encoder(images)

    def forward(self, features: torch.Tensor, y_t: torch.Tensor, prior: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
        h = F.softplus(self.norm1(self.layer1(torch.cat([y_t, prior], dim=-1), t)))
        h = h * features
        h = F.softplus(self.norm2(self.layer2(h, t)))
        h = F.softplus(self.norm3(self.layer3(h, t)))
        return self.output(h)
