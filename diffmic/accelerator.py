"""The Accelerator every command uses: DDP by default, DeepSpeed when given its config, CPU or GPU.

Works standalone (one process) and under `accelerate launch` or Slurm with any number of processes. It
takes plain values, not a training config: evaluation and training build it alike.
"""

from __future__ import annotations

import os
import socket
import warnings

import torch

from .hardware import cpu_has_native_bf16


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def resolve_precision(requested: str, on_gpu: bool) -> str:
    """The precision asked for where the device does it natively: bf16 on GPUs that have it and on CPUs
    with AVX512-BF16 or AMX (diffmic.hardware), fp16 on GPUs only; fp32 elsewhere, said once."""
    if not on_gpu:
        if requested == "bf16" and cpu_has_native_bf16():
            return "bf16"
        if requested != "no":
            warnings.warn(f"train.mixed_precision={requested} is not used on this CPU (no native {requested} "
                          f"kernels: bf16 needs avx512_bf16 or AMX); training in fp32", stacklevel=2)
        return "no"
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        warnings.warn("this GPU has no bf16 support; using fp16 with loss scaling", stacklevel=2)
        return "fp16"
    return requested


def inference_precision(requested: str) -> str:
    """An evaluation's precision as Accelerate names it ("bf16" or "no"): `requested` is "fp32", "bf16" or
    "auto" (bf16 where the device has it natively). bf16 asked for without native support runs fp32, said once."""
    if requested == "fp32":
        return "no"
    native = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_native_bf16()
    if requested == "bf16" and not native:
        warnings.warn("--precision bf16 is not used: this device has no native bf16 (a CPU needs avx512_bf16 or "
                      "AMX); evaluating in fp32", stacklevel=2)
    return "bf16" if native else "no"


def _single_process_environment() -> None:
    """DeepSpeed needs a process-group environment even for one process, or it tries MPI discovery."""
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})


def make_accelerator(mixed_precision: str = "no", grad_accum: int = 1, deepspeed: dict | None = None,
                     log_with: list[str] | None = None):
    """An Accelerator for `mixed_precision` ("no", "bf16", "fp16"; resolved for the device), accumulating
    gradients over `grad_accum` micro-batches, under DeepSpeed when its JSON config is given, reporting to
    Accelerate's experiment trackers `log_with` (started later with `init_trackers`)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    on_gpu = torch.cuda.is_available()
    precision = resolve_precision(mixed_precision, on_gpu)
    # The denoiser sits idle during the DCG warm-up: DDP must tolerate parameters without gradients.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    plugin = None
    if deepspeed is not None:
        from accelerate.utils import DeepSpeedPlugin

        _single_process_environment()
        # Accelerate starts DeepSpeed's process group only when this is set (as `accelerate launch
        # --use_deepspeed` does) and the CPU flag is off; DeepSpeed then runs on the CPU by itself.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed)
    if not on_gpu and (plugin is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # no NCCL without GPUs
    return Accelerator(mixed_precision=precision, cpu=not on_gpu and plugin is None, kwargs_handlers=handlers,
                       gradient_accumulation_steps=grad_accum, deepspeed_plugin=plugin, log_with=log_with or None,
                       # Trackers that write files refuse to start without a folder; the real one (the run
                       # folder, chosen after the process group is up) is set before init_trackers.
                       project_dir="." if log_with else None)
