"""ResNet trunks (torchvision architectures) with optional weights from a local file, never a download."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models

from ..errors import PretrainedWeightsError

TRUNK_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


def load_local_weights(module: nn.Module, path: str | Path, arch: str) -> None:
    """Loads a torchvision ResNet state_dict (the classifier head is ignored) from `path`."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(
            f"pretrained weights {path} do not exist; download the torchvision {arch} weights once "
            f"(e.g. from the torch hub cache ~/.cache/torch/hub/checkpoints/) and point the config at the file, "
            f"or set the key to '' to train from scratch")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "module.fc."))}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that differ: weights of another architecture
        raise PretrainedWeightsError(f"{path} does not hold {arch} weights: {str(error).splitlines()[1:2]}") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"{path} does not hold {arch} weights: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")


class ResNetTrunk(nn.Module):
    """conv1 .. layer4 of a torchvision ResNet: (B, 3, H, W) -> (B, channels, H/32, W/32)."""

    def __init__(self, arch: str = "resnet18", pretrained: str = ""):
        super().__init__()
        if arch not in TRUNK_CHANNELS:
            raise ValueError(f"unknown backbone {arch!r}; expected one of {', '.join(TRUNK_CHANNELS)}")
        resnet = getattr(models, arch)(weights=None)
        if pretrained:
            load_local_weights(resnet, pretrained, arch)
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
