"""Shared timing helpers of the benchmarks (wall clock around whole calls, forward hooks for parts)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch

from diffmic.config import load_config
from diffmic.models import build_model

REPO = Path(__file__).resolve().parents[1]
REPO_CONFIGS = {"paper (HAM10000, 224 px, C=7)": str(REPO / "configs" / "ham10000.yaml"),
                "digits (64 px, C=10)": str(REPO / "configs" / "digits.yaml")}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PartTimer:
    """Seconds spent inside chosen modules' forward calls, and how often each ran."""

    def __init__(self, parts: dict[str, torch.nn.Module]):
        self.seconds = {name: 0.0 for name in parts}
        self.calls = {name: 0 for name in parts}
        self.handles = []
        for name, module in parts.items():
            self.handles.append(module.register_forward_pre_hook(self._start(name)))
            self.handles.append(module.register_forward_hook(self._stop(name)))
        self._started = {}

    def _start(self, name):
        def hook(module, inputs):
            synchronize()
            self._started[name] = time.perf_counter()
        return hook

    def _stop(self, name):
        def hook(module, inputs, output):
            synchronize()
            self.seconds[name] += time.perf_counter() - self._started[name]
            self.calls[name] += 1
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextmanager
def timed():
    synchronize()
    box = {"start": time.perf_counter()}
    yield box
    synchronize()
    box["seconds"] = time.perf_counter() - box["start"]


def model_for(config_path: str, device: torch.device, **overrides):
    config = load_config(config_path, [f"{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    return build_model(config).to(device), config


def device_and_threads() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"
