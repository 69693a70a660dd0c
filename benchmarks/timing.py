"""Shared timing helpers of the benchmarks (wall clock around whole calls, forward hooks for parts)."""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from diffmic.checkpoint import without_pretrained
from diffmic.config import load_config
from diffmic.hardware import cpu_info
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


def model_for(config_path: str, device: torch.device, args: argparse.Namespace | None = None, **overrides):
    config = load_config(config_path, [f"{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    # Timing does not depend on the starting weights: random ones, so no ImageNet file is needed offline.
    model = build_model(without_pretrained(config)).to(device)
    if args is not None and args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, config


def synthetic_batch(batch_size: int, image_size: int, num_classes: int, device: torch.device) -> dict:
    """A training batch of random images and labels in the one batch format (image, label, key)."""
    return {"image": torch.randn(batch_size, 3, image_size, image_size, device=device),
            "label": torch.randint(0, num_classes, (batch_size,), device=device),
            "key": [f"synthetic-{index}" for index in range(batch_size)]}


def cpu_description() -> str:
    """The CPU's model name and the vector/matrix extensions that decide its fast dtypes."""
    model, flags = cpu_info()
    present = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if flag in flags]
    return f"{model} ({', '.join(present) or 'no avx2'})"


def device_and_threads(args: argparse.Namespace | None = None) -> str:
    """What a measurement ran on: device, threads, precision; printed first by every benchmark."""
    amp = args.amp if args is not None and getattr(args, "amp", "no") != "no" else "fp32"
    precision = f"precision {amp}" + (", channels_last weights" if args is not None and args.channels_last else "")
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {precision}"
    return f"CPU {cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {precision}"


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """--batch and --amp: a GPU wants larger batches and bf16 to show its real throughput."""
    parser.add_argument("--batch", type=int, default=0, help="batch size for every config (default: per config)")
    parser.add_argument("--amp", choices=["no", "bf16", "fp16"], default="no",
                        help="autocast dtype, as train.mixed_precision (fp16: CUDA only; bf16 on a CPU is fast "
                             "only with avx512_bf16 or AMX)")
    parser.add_argument("--channels-last", action="store_true",
                        help="store conv weights channels_last too (the package keeps them contiguous)")


def batch_for(name: str, defaults: dict[str, int], args: argparse.Namespace) -> int:
    return args.batch or defaults[name]


def autocast(args: argparse.Namespace, device: torch.device):
    if args.amp == "no":
        return nullcontext()
    if device.type != "cuda" and args.amp != "bf16":
        raise SystemExit(f"--amp {args.amp} needs a GPU; on a CPU only bf16 autocasts")
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp])
