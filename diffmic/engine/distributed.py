"""The Accelerator every command uses: DDP by default, DeepSpeed ZeRO on request, CPU or GPU.

Works standalone (one process) and under `accelerate launch` or Slurm with any number of processes.
"""

from __future__ import annotations

import json
import os
import socket
import warnings

import torch

from ..config import ConfigError, TrainConfig
from ..packaged import NotFoundError, find_file


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def resolve_precision(requested: str, on_gpu: bool) -> str:
    """bf16 where the device does it natively; the CPU here has no bf16 units, so it trains in fp32."""
    if not on_gpu:
        if requested != "no":
            warnings.warn(f"train.mixed_precision={requested} is not used on the CPU (no fast {requested} "
                          f"kernels); training in fp32", stacklevel=2)
        return "no"
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        warnings.warn("this GPU has no bf16 support; using fp16 with loss scaling", stacklevel=2)
        return "fp16"
    return requested


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


def _single_process_environment() -> None:
    """DeepSpeed needs a process-group environment even for one process, or it tries MPI discovery."""
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})


def make_accelerator(train: TrainConfig, gradient_accumulation: bool = True):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    on_gpu = torch.cuda.is_available()
    precision = resolve_precision(train.mixed_precision, on_gpu)
    # The denoiser sits idle during the DCG warm-up: DDP must tolerate parameters without gradients.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    plugin = None
    if uses_deepspeed(train):
        from accelerate.utils import DeepSpeedPlugin

        _single_process_environment()
        # Accelerate starts DeepSpeed's process group only when this is set (as `accelerate launch
        # --use_deepspeed` does) and the CPU flag is off; DeepSpeed then runs on the CPU by itself.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(train, precision))
    if not on_gpu and (plugin is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # no NCCL without GPUs
    return Accelerator(mixed_precision=precision, cpu=not on_gpu and plugin is None, kwargs_handlers=handlers,
                       gradient_accumulation_steps=train.grad_accum if gradient_accumulation else 1,
                       deepspeed_plugin=plugin)


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
