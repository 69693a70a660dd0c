"""ImageNet weights without a network: state dicts placed where torchvision's weights API looks for them."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision import models

from diffmic.models.pretrained import imagenet_weights


def place_imagenet_file(torch_home: Path, arch: str, seed: int = 0) -> tuple[Path, dict]:
    """Writes a (random, seeded) `arch` state dict as the torch hub cache file of its IMAGENET1K_V1 weights under
    `torch_home`; returns the path and the state dict."""
    torch.manual_seed(seed)
    state = getattr(models, arch)(weights=None).state_dict()
    url_name = imagenet_weights(arch).url.rsplit("/", 1)[-1]
    path = torch_home / "hub" / "checkpoints" / url_name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path, state
