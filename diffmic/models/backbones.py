"""ResNet trunks (torchvision architectures), starting from ImageNet weights, a state dict file or random init."""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models

from .pretrained import load_pretrained

TRUNK_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


class ResNetTrunk(nn.Module):
    """conv1 .. layer4 of a torchvision ResNet: (B, 3, H, W) -> (B, channels, H/32, W/32)."""

    def __init__(self, arch: str = "resnet18", pretrained: str = ""):
        super().__init__()
        if arch not in TRUNK_CHANNELS:
            raise ValueError(f"unknown backbone {arch!r}; expected one of {', '.join(TRUNK_CHANNELS)}")
        resnet = getattr(models, arch)(weights=None)
        if pretrained:  # 'imagenet' or a file (models/pretrained.py); '' keeps torchvision's random init
            load_pretrained(resnet, pretrained, arch)
        self.channels = TRUNK_CHANNELS[arch]
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layers = nn.Sequential(resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Channels-last activations are faster on CPUs (oneDNN) and tensor cores alike. The weights keep
        # the default layout: DeepSpeed broadcasts parameters as flat bytes and needs them contiguous.
        return self.layers(self.stem(images.contiguous(memory_format=torch.channels_last)))


class PlainClassifier(nn.Module):
    """A ResNet with global average pooling and a linear head: the `basic` ablation and the prior
    of `c1`. Returns logits."""

    def __init__(self, num_classes: int, arch: str = "resnet18", pretrained: str = ""):
        super().__init__()
        self.trunk = ResNetTrunk(arch, pretrained)
        self.head = nn.Linear(self.trunk.channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(images).mean(dim=(2, 3)))
