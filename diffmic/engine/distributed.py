"""Training's side of the Accelerator: the DeepSpeed JSON filled in from the config, and the precision the
forward really runs in. The factory itself is diffmic.accelerator, shared with evaluation."""

from __future__ import annotations

import json
import os

import torch

from ..accelerator import make_accelerator, resolve_precision
from ..config import ConfigError, TrainConfig
from ..packaged import NotFoundError, find_file


def uses_deepspeed(train: TrainConfig) -> bool:
    """The config chooses; `accelerate launch --use_deepspeed` (which sets the variable) also does."""
    return train.distributed == "deepspeed" or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def deepspeed_config(train: TrainConfig, precision: str) -> dict:
    """The JSON file of `train.deepspeed_config` with the values diffmic owns filled in from the config,
    so the two can never disagree (batch, accumulation, clipping, precision)."""
    try:  # a path, then ./launch/, then the packaged launch files (diffmic.packaged)
        path = find_file(train.deepspeed_config, "launch", "DeepSpeed config")
    except NotFoundError as error:
        raise ConfigError("train.deepspeed_config", f"{error}; use launch/deepspeed/zero2.json") from None
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError("train.deepspeed_config", f"{path} is not valid JSON: {error}") from None
    values.update({
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        # DeepSpeed clips all parameters together: the denoiser's clip applies to the DCG too.
        "gradient_clipping": train.grad_clip,
        # DeepSpeed's own bf16/fp16 modes cast weights, buffers and BatchNorm statistics to half precision
        # and want half-precision inputs. Its torch_autocast mode keeps fp32 weights and autocasts the
        # forward, as Accelerate does under DDP: both engines then train with the same numerics.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "torch_autocast": {"enabled": precision != "no", "dtype": precision if precision != "no" else "bf16"},
        # Our Adam is torch's (two parameter groups); DeepSpeed's fused Adam would need a compile.
        "zero_allow_untested_optimizer": True,
    })
    values.pop("train_batch_size", None)
    return values


def training_accelerator(train: TrainConfig):
    """The Accelerator of a training run: its precision, accumulation and engine from `train`."""
    check_trackers(train.log_with)
    precision = resolve_precision(train.mixed_precision, torch.cuda.is_available())
    return make_accelerator(precision, train.grad_accum, deepspeed_config(train, precision) if uses_deepspeed(train)
                            else None, train.log_with)


def check_trackers(names: list[str]) -> None:
    """Every tracker of train.log_with is installed, or one message says how to install it (Accelerate itself
    would only warn and drop it, and the run would log nowhere)."""
    import importlib.util

    from ..config import TRACKERS

    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        packages = " ".join(TRACKERS[name] for name in missing)
        raise ConfigError("train.log_with", f"{', '.join(missing)} is not installed: pip install {packages} "
                          f"(or pip install 'diffmic[{','.join(missing)}]'), or take it out of train.log_with")


def training_precision(accelerator) -> str:
    """"no", "bf16" or "fp16" as the forward really runs: under DeepSpeed the autocast is its torch_autocast
    section, and Accelerate's own flag then reads "no"."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return accelerator.mixed_precision
    autocast = plugin.deepspeed_config.get("torch_autocast", {})
    return str(autocast.get("dtype", "bf16")) if autocast.get("enabled") else "no"


def forward_autocast(accelerator):
    """The autocast context factory for forwards outside the training step (validation). Accelerate's own
    is a no-op under DeepSpeed, whose engine autocasts only its own forward."""
    precision = training_precision(accelerator)
    if getattr(accelerator.state, "deepspeed_plugin", None) is None or precision == "no":
        return accelerator.autocast
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(accelerator.device.type, dtype=dtype)
