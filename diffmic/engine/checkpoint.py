"""Checkpoints: `RUN/checkpoints/step-N/` folders that count only once their COMPLETE marker exists.

A folder holds Accelerate's full training state (model, optimizer, every rank's RNG state, the EMA and
the trainer's position, DDP or DeepSpeed alike) for exact resumption, plus `model.pt`: the config, the
class names and fp32 weights (raw and EMA), enough to rebuild the model for evaluation without the run.
Writing goes to a hidden `.step-N.partial` folder renamed into place, then the marker: a process killed
during a save leaves the previous checkpoint untouched.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..config import Config, config_from_dict, dump_config
from ..errors import CheckpointError
from ..fileio import write_json_atomic

MARKER = "COMPLETE"
MODEL_FILE = "model.pt"
BEST_FILE = "best.json"
# Sections whose change makes old weights meaningless (as opposed to e.g. the number of epochs).
MODEL_KEYS = ("data.num_classes", "data.image_size", "model", "diffusion.timesteps", "diffusion.fused_prior")


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    meta: dict


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """Every checkpoint whose marker exists, oldest first."""
    found = []
    root = checkpoint_root(run_dir)
    for folder in root.glob("step-*") if root.is_dir() else []:
        marker = folder / MARKER
        if folder.name.removeprefix("step-").isdigit() and marker.is_file():
            found.append(CheckpointInfo(folder, int(folder.name.removeprefix("step-")), json.loads(marker.read_text())))
    return sorted(found, key=lambda info: info.step)


def best_step(run_dir: str | Path) -> int | None:
    path = checkpoint_root(run_dir) / BEST_FILE
    return json.loads(path.read_text())["step"] if path.is_file() else None


def find_checkpoint(run_dir: str | Path, which: str = "last") -> CheckpointInfo:
    """`last`, `best` or `step-N` of a run (or `which` may be a checkpoint folder itself)."""
    direct = Path(which)
    if (direct / MARKER).is_file():
        return CheckpointInfo(direct, int(direct.name.removeprefix("step-")), json.loads((direct / MARKER).read_text()))
    available = complete_checkpoints(run_dir)
    if not available:
        raise CheckpointError(f"{checkpoint_root(run_dir)} holds no complete checkpoint; train first "
                              f"(diffmic train ... --run-dir {run_dir}) or pass the right --run")
    if which == "last":
        return available[-1]
    if which == "best":
        step = best_step(run_dir)
        if step is None:
            raise CheckpointError(f"{run_dir} has no best checkpoint yet (no validation ran); use --checkpoint last")
        which = f"step-{step}"
    for info in available:
        if info.path.name == which:
            return info
    names = ", ".join(info.path.name for info in available)
    raise CheckpointError(f"{run_dir} has no complete checkpoint '{which}'; available: last, best, {names}")


def config_differences(saved: Config, current: Config) -> list[str]:
    saved_values, current_values = _flatten(saved.to_dict()), _flatten(current.to_dict())
    return [f"{key}: checkpoint {saved_values[key]!r}, run {current_values[key]!r}"
            for key in sorted(saved_values)
            if key.startswith(MODEL_KEYS) and saved_values[key] != current_values.get(key)]


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_compatible(info: CheckpointInfo, config: Config, classes: list[str]) -> None:
    """Refuses a checkpoint of another model or class list with one message naming the difference."""
    saved = config_from_dict(yaml.safe_load(info.meta["config"]))
    problems = config_differences(saved, config)
    if info.meta.get("classes") != list(classes):
        problems.append(f"classes: checkpoint {info.meta.get('classes')}, shards {list(classes)}")
    if problems:
        raise CheckpointError(f"{info.path} was made with another configuration ({'; '.join(problems[:4])}). "
                              f"Train into a new --run-dir, or use the config and shards of that run.")


def load_model_file(info: CheckpointInfo, map_location="cpu") -> dict:
    path = info.path / MODEL_FILE
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        # torch's unpickling messages run to a page; the first line says enough.
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is missing or corrupt ({reason}); pick another checkpoint "
                              f"(--checkpoint last, best or step-N)") from None


def build_model_from_checkpoint(info: CheckpointInfo, use_ema: bool = True):
    """The DiffMIC model of a checkpoint, in eval mode, from its model.pt alone."""
    from ..models import build_model

    payload = load_model_file(info)
    config = config_from_dict(yaml.safe_load(payload["config"]))
    model = build_model(config)
    model.load_state_dict(payload["model"])
    if use_ema and payload.get("ema") is not None:
        prefix = "denoiser."
        state = model.state_dict()
        state.update({prefix + name: value for name, value in payload["ema"].items()})
        model.load_state_dict(state)
    return model.eval(), config, payload


def model_payload(model, ema, config: Config, classes: list[str], extra: dict) -> dict:
    state = {name: value.detach().float().cpu() if value.is_floating_point() else value.detach().cpu()
             for name, value in model.state_dict().items()}
    return {"config": dump_config(config), "classes": list(classes), "model": state,
            "ema": ema.state_dict()["shadow"] if ema is not None else None, **extra}


def prepare_folder(run_dir: str | Path, step: int) -> tuple[Path, Path]:
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    partial, final = root / f".step-{step}.partial", root / f"step-{step}"
    shutil.rmtree(partial, ignore_errors=True)
    return partial, final


def finalise(partial: Path, final: Path, meta: dict) -> None:
    """Renames a fully written folder into place, then writes the marker that makes it count."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    write_json_atomic(final / MARKER, meta)


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Deletes all but the last `keep_last` complete checkpoints and the best one, and stale partials."""
    keep = {best_step(run_dir)}
    available = complete_checkpoints(run_dir)
    keep.update(info.step for info in available[-keep_last:])
    for info in available:
        if info.step not in keep:
            shutil.rmtree(info.path, ignore_errors=True)


def remove_partials(run_dir: str | Path) -> None:
    for folder in checkpoint_root(run_dir).glob(".step-*.partial"):
        shutil.rmtree(folder, ignore_errors=True)
