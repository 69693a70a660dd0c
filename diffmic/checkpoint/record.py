"""A checkpoint on disk and its typed record: the one place that names its folders and files.

    RUN/checkpoints/step-N/        a checkpoint of step N; it counts once its COMPLETE record exists
        COMPLETE                   the record (JSON): format, kind, step, position, classes, config,
                                   provenance, every file of the folder with its size and sha256, and
                                   the record's own checksum
        model.safetensors          fp32 weights of the whole model (the only copy)
        ema.safetensors            the denoiser's EMA weights (with train.ema)
        training/                  training state; absent from a weights-only checkpoint
            state.json             the trainer's position and best score, the loss scaler
            optimizer.safetensors  both parameter groups' moments, the groups in its header (DDP)
            rng-<rank>.safetensors every process's random generators
            deepspeed/             DeepSpeed's engine files instead of optimizer.safetensors
    RUN/checkpoints/best-N/        weights only: the best validated model so far
    RUN/checkpoints/best.json      which best-N that is, with its score
    RUN/checkpoints/.NAME.partial/ a folder being written; renamed into place when complete

Writing goes to the partial folder, which is renamed into place before the record is written: a
process killed during a save leaves the previous checkpoints untouched. Each file's sha256 is computed from its
bytes while they are written (files.py); `verify` compares the files a command is about to read with the record
(eval and predict: the weights; a resume: every file), so a file changed in place, even at the same size, is
refused by name before anything in it is used.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import Config, config_from_dict, dump_config, flatten
from ..errors import CheckpointError
from ..fileio import CHECKSUM_KEY, content_digest, file_sha256, sealed
from .files import Written, load_tensors, read_json, refuse, save_tensors, sha256_of, write_json

FORMAT = 3
UNCHECKED_FORMAT = 2  # diffmic before per-file checksums: sizes only, still read
MARKER = "COMPLETE"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
WEIGHT_FILES = (MODEL_FILE, EMA_FILE)  # what eval and predict read (EMA_FILE where the checkpoint has one)
STATE_FILE = "training/state.json"
OPTIMIZER_FILE = "training/optimizer.safetensors"
DEEPSPEED_DIR = "training/deepspeed"
BEST_FILE = "best.json"
TRAINING, WEIGHTS = "training", "weights"  # the two kinds of checkpoint
# Settings the weights' shapes or meaning depend on: never changed on a resume or a fine-tuning.
MODEL_KEYS = ("data.num_classes", "data.image_size", "model", "diffusion.timesteps", "diffusion.fused_prior")
# What diffmic 0.1 left in a checkpoint (Accelerate's pickles): named when such a folder is refused.
PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth")


def rng_file(rank: int) -> str:
    return f"training/rng-{rank}.safetensors"


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder and its record."""

    path: Path
    record: dict

    @property
    def step(self) -> int:
        return int(self.record["step"])

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def has_training_state(self) -> bool:
        return self.record["kind"] == TRAINING

    @property
    def has_ema(self) -> bool:
        return EMA_FILE in self.record["files"]

    @property
    def files(self) -> list[str]:
        """Every file of the checkpoint (relative names), as its record lists them."""
        return list(self.record["files"])

    @property
    def classes(self) -> list[str]:
        return list(self.record["classes"])

    @cached_property
    def config(self) -> Config:
        return config_from_dict(yaml.safe_load(self.record["config"]))

    @property
    def shards(self) -> str | None:
        return self.record.get("provenance", {}).get("shards")

    @property
    def manifest_sha256(self) -> str | None:
        return self.record.get("provenance", {}).get("manifest_sha256")

    @property
    def position(self) -> dict:
        """step, joint_step, epoch and batch_in_epoch: where training stood when it was written."""
        return {key: int(self.record.get(key, 0)) for key in ("step", "joint_step", "epoch", "batch_in_epoch")}

    def file(self, name: str) -> Path:
        return self.path / name


# --- names --------------------------------------------------------------------------------------------
def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_folder(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step-{step}"


def best_folder(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"best-{step}"


def partial_folder(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def _step_of(folder: Path, prefix: str) -> int | None:
    number = folder.name.removeprefix(prefix)
    return int(number) if folder.name.startswith(prefix) and number.isdigit() else None


# --- reading ------------------------------------------------------------------------------------------
def read_checkpoint(folder: str | Path) -> Checkpoint | None:
    """The checkpoint in `folder`, None while it has no COMPLETE record; CheckpointError (naming the
    file) for a record that is not diffmic's current format, or that changed since it was written."""
    folder = Path(folder)
    marker = folder / MARKER
    if not marker.is_file():
        return None
    record = read_json(marker)
    if record.get("format") not in (FORMAT, UNCHECKED_FORMAT):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        named = folder / pickles[0] if pickles else marker
        raise refuse(named, f"{folder.name} is in the format of diffmic 0.1 (Accelerate's pickled training "
                            f"state), which diffmic no longer loads because loading a pickle can run code")
    if record["format"] == FORMAT:
        content = {key: value for key, value in record.items() if key != CHECKSUM_KEY}
        if record.get(CHECKSUM_KEY) != content_digest(content):
            raise refuse(marker, "it was changed after diffmic wrote it (its checksum does not match its content)")
        record = content
    fields = (("step", int), ("kind", str), ("classes", list), ("config", str), ("files", dict))
    for key, kind in fields + ((("sha256", dict),) if record["format"] == FORMAT else ()):
        if not isinstance(record.get(key), kind) or (key == "kind" and record[key] not in (TRAINING, WEIGHTS)):
            raise refuse(marker, f"its field '{key}' is missing or of the wrong type")
    return Checkpoint(folder, record)


def verify(checkpoint: Checkpoint, read: Iterable[str] = WEIGHT_FILES) -> Checkpoint:
    """Every file the record lists is there at its recorded size, the folder holds nothing else, and the files
    named in `read` (those the caller is about to load) have the sha256 the record gives them."""
    listed = checkpoint.record["files"]
    for name, size in listed.items():
        path = checkpoint.file(name)
        if not path.is_file():
            raise refuse(path, "it is missing (the checkpoint is incomplete)")
        if path.stat().st_size != size:
            raise refuse(path, f"it has {path.stat().st_size} bytes where the checkpoint recorded {size} "
                               f"(truncated or replaced)")
    for path in sorted(checkpoint.path.rglob("*")):
        name = path.relative_to(checkpoint.path).as_posix()
        if path.is_file() and name != MARKER and name not in listed:
            raise refuse(path, "it is not one of the files the checkpoint's COMPLETE record lists "
                               "(diffmic wrote no such file)")
    digests = checkpoint.record.get("sha256", {})  # none in a checkpoint of the unchecked format
    for name in read:
        if name in digests and sha256_of(checkpoint.file(name)) != digests[name]:
            raise refuse(checkpoint.file(name), "its content changed since it was written (its sha256 differs "
                                                "from the one in the checkpoint's COMPLETE record)")
    return checkpoint


def complete_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Every step-N checkpoint whose record exists, oldest first."""
    root = checkpoint_root(run_dir)
    found = []
    for folder in root.glob("step-*") if root.is_dir() else []:
        if _step_of(folder, "step-") is not None and (checkpoint := read_checkpoint(folder)) is not None:
            found.append(checkpoint)
    return sorted(found, key=lambda checkpoint: checkpoint.step)


def unrecorded_folders(run_dir: str | Path) -> list[Path]:
    """step-N folders without a COMPLETE record (a save killed after its rename, or the record deleted)."""
    root = checkpoint_root(run_dir)
    return sorted(folder for folder in (root.glob("step-*") if root.is_dir() else [])
                  if _step_of(folder, "step-") is not None and not (folder / MARKER).exists())


def best_record(run_dir: str | Path) -> dict | None:
    """best.json: {"step", "metric", "score", "split"}; None before the first validation."""
    path = checkpoint_root(run_dir) / BEST_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    content = {key: value for key, value in record.items() if key != CHECKSUM_KEY}
    if CHECKSUM_KEY in record and record[CHECKSUM_KEY] != content_digest(content):
        raise refuse(path, "it was changed after diffmic wrote it (its checksum does not match its content)")
    if not isinstance(content.get("step"), int) or isinstance(content["step"], bool):
        raise refuse(path, "its field 'step' is missing or not an integer")
    return content


def best_step(run_dir: str | Path) -> int | None:
    record = best_record(run_dir)
    return record["step"] if record is not None else None


def find_checkpoint(run_dir: str | Path, which: str = "last", read: Iterable[str] = WEIGHT_FILES) -> Checkpoint:
    """`last`, `best` or `step-N` of a run (or `which` may be a checkpoint folder itself), verified: the files in
    `read` (by default the weights, what eval and predict load) against their sha256."""
    direct = read_checkpoint(which) if Path(which).is_dir() else None
    if direct is not None:
        return verify(direct, read)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist; pass the folder `diffmic train` wrote "
                              f"(runs/<dataset>-<time>) with --run")
    available = complete_checkpoints(run_dir)
    if which == "best":
        step = best_step(run_dir)
        if step is None:
            kept = sorted(checkpoint_root(run_dir).glob("best-*"))
            if kept:  # best.json went missing, not the best: say which file, and the folder to pass instead
                raise CheckpointError(f"{checkpoint_root(run_dir) / BEST_FILE} is missing, though {kept[-1].name} "
                                      f"exists; restore it, or pass --checkpoint {kept[-1]}")
            raise CheckpointError(f"{run_dir} has no best checkpoint yet (no validation ran); use --checkpoint last")
        best = read_checkpoint(best_folder(run_dir, step))
        if best is None:
            raise CheckpointError(f"{checkpoint_root(run_dir) / BEST_FILE} names best-{step}, but "
                                  f"{best_folder(run_dir, step) / MARKER} is missing, so it is not a complete "
                                  f"checkpoint; use --checkpoint last")
        return verify(best, read)
    if not available:
        raise CheckpointError(f"{checkpoint_root(run_dir)} holds no complete checkpoint; train first "
                              f"(diffmic train ... --run-dir {run_dir}) or pass the right --run")
    if which == "last":
        return verify(available[-1], read)
    for checkpoint in available:
        if checkpoint.name == which:
            return verify(checkpoint, read)
    names = ", ".join(checkpoint.name for checkpoint in available)
    raise CheckpointError(f"{run_dir} has no complete checkpoint '{which}'; available: last, best, {names}")


def load_weights(checkpoint: Checkpoint, use_ema: bool = True, device: str = "cpu") -> dict:
    """The model's state dict, with the EMA weights in place of the denoiser's when asked and present."""
    state, _ = load_tensors(checkpoint.file(MODEL_FILE), device)
    if use_ema and checkpoint.has_ema:
        ema, _ = load_tensors(checkpoint.file(EMA_FILE), device)
        state.update({f"denoiser.{name}": value for name, value in ema.items()})
    return state


def load_ema(checkpoint: Checkpoint, device: str = "cpu") -> dict | None:
    return load_tensors(checkpoint.file(EMA_FILE), device)[0] if checkpoint.has_ema else None


def build_model_from_checkpoint(checkpoint: Checkpoint, use_ema: bool = True):
    """The DiffMIC model of a checkpoint, in eval mode, from its weights and record alone."""
    from ..models import build_model

    with skipped_initialisation():  # every weight comes from the file: 1.1 s of random init saved at the paper config
        model = build_model(without_pretrained(checkpoint.config))
    load_into(model, load_weights(checkpoint, use_ema), checkpoint.file(MODEL_FILE))
    return model.eval()


def without_pretrained(config: Config) -> Config:
    """The same model with no pretrained file to read (ImageNet weights, a state dict): a checkpoint holds
    every weight, so evaluating or resuming a run never needs those files, offline or not."""
    values = config.to_dict()
    for part in ("dcg", "denoiser", "classifier"):
        values["model"][part]["pretrained"] = ""
    return config_from_dict(values)


@contextmanager
def skipped_initialisation():
    """Leaves new parameters uninitialised (torch.nn.init's functions do nothing) while a model whose every
    parameter and buffer is loaded next is built; `load_into` then checks that nothing was left out."""
    names = [name for name in dir(torch.nn.init) if name.endswith("_") and not name.startswith("_")]
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def load_into(module, state: dict, source: Path) -> None:
    """`load_state_dict`, with a mismatch reported as one line naming the file."""
    missing, unexpected = module.state_dict().keys() - state.keys(), state.keys() - module.state_dict().keys()
    if missing or unexpected:
        raise refuse(source, f"its weights do not fit the model (missing {sorted(missing)[:3]}, unexpected "
                             f"{sorted(unexpected)[:3]})")
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise refuse(source, f"its weights do not fit the model ({str(error).splitlines()[-1].strip()})") from None


# --- writing ------------------------------------------------------------------------------------------
def prepare_partial(final: Path) -> Path:
    partial = partial_folder(final)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def new_record(kind: str, step: int, config: Config, classes: list[str], **fields: Any) -> dict:
    return {"format": FORMAT, "kind": kind, "step": int(step), "classes": list(classes),
            "config": dump_config(config), **fields}


def finalise(partial: Path, final: Path, record: dict, written: dict[str, Written]) -> Checkpoint:
    """Renames a fully written folder into place, then writes the record that makes it count. `written` gives each
    file's size and sha256 as its writer computed them; a file no writer of ours reported (a library's own, should
    one appear) is hashed here."""
    on_disk = sorted(path.relative_to(partial).as_posix() for path in partial.rglob("*") if path.is_file())
    digests = {name: written[name] if name in written else Written((partial / name).stat().st_size,
                                                                     file_sha256(partial / name))
               for name in on_disk}
    record = {**record, "files": {name: digest.size for name, digest in digests.items()},
              "sha256": {name: digest.sha256 for name, digest in digests.items()}}
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    write_json(final / MARKER, sealed(record))
    return Checkpoint(final, record)


def write_weights_files(folder: Path, model_state: dict, ema_state: dict | None,
                        same_as: Path | None = None) -> dict[str, Written]:
    """model.safetensors and ema.safetensors; hard links to those of `same_as` (a checkpoint of the same
    weights, e.g. the best of this very step) where the file system allows, so they take no second space.
    Returns what was written."""
    linked_from = _readable(same_as) if same_as is not None else None
    written = {}
    for name, state in ((MODEL_FILE, model_state), (EMA_FILE, ema_state)):
        if state is None:
            continue
        if linked_from is not None and name in linked_from.record.get("sha256", {}):
            try:
                os.link(same_as / name, folder / name)
                written[name] = Written(linked_from.record["files"][name], linked_from.record["sha256"][name])
                continue
            except OSError:
                pass
        written[name] = save_tensors(folder / name, fp32_cpu(state))
    return written


def _readable(folder: Path) -> Checkpoint | None:
    """The checkpoint in `folder` if its record reads; a damaged one is simply not linked to."""
    try:
        return read_checkpoint(folder)
    except CheckpointError:
        return None


def write_weights_checkpoint(run_dir: str | Path, model_state: dict, config: Config, classes: list[str], *,
                             ema_state: dict | None = None, step: int = 0, folder: Path | None = None,
                             same_as: Path | None = None, **fields: Any) -> Checkpoint:
    """A weights-only checkpoint (RUN/checkpoints/step-N/ unless `folder` is given): `eval` and `predict`
    read it, and `diffmic train --run-dir RUN` fine-tunes from it (its weights and EMA, a fresh optimiser).
    `model_state` is a DiffMIC state dict, `ema_state` the denoiser's EMA (names without `denoiser.`);
    `fields` land in the record (e.g. `imported_from={...}`); `same_as` is a checkpoint folder of the very same
    weights to hard-link to."""
    final = Path(folder) if folder is not None else step_folder(run_dir, step)
    partial = prepare_partial(final)
    written = write_weights_files(partial, model_state, ema_state, same_as)
    return finalise(partial, final, new_record(WEIGHTS, step, config, classes, **fields), written)


def write_best_checkpoint(run_dir: str | Path, model_state: dict, config: Config, classes: list[str], *, step: int,
                          selection: dict, ema_state: dict | None = None, same_as: Path | None = None,
                          **fields: Any) -> Checkpoint:
    """RUN/checkpoints/best-N (weights only) recorded in best.json as the run's best, the previous best removed.
    `selection` says how it was chosen ({"metric", "score", "split"}; score None when not known)."""
    final = best_folder(run_dir, step)
    checkpoint = write_weights_checkpoint(run_dir, model_state, config, classes, ema_state=ema_state, step=step,
                                          folder=final, same_as=same_as, selection=selection, **fields)
    write_json(checkpoint_root(run_dir) / BEST_FILE, sealed({"step": step, **selection}))
    for folder in checkpoint_root(run_dir).glob("best-*"):
        if folder != final:
            shutil.rmtree(folder, ignore_errors=True)
    return checkpoint


def fp32_cpu(state: dict) -> dict:
    return {name: value.detach().float().cpu() if value.is_floating_point() else value.detach().cpu()
            for name, value in state.items()}


def remove_partials(run_dir: str | Path) -> None:
    for folder in checkpoint_root(run_dir).glob(".*.partial"):
        shutil.rmtree(folder, ignore_errors=True)


# --- configuration ------------------------------------------------------------------------------------
# Settings that say how this machine reaches the data, never what is trained: a resume on another machine may
# change them without --allow-changes.
MACHINE_LOCAL_KEYS = ("data.cache_dir", "data.fetch_retries")


def config_changes(saved: Config, current: Config) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (checkpoint's value, current value)} for every setting that differs, less MACHINE_LOCAL_KEYS."""
    old, new = flatten(saved.to_dict()), flatten(current.to_dict())
    return {key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key) and key not in MACHINE_LOCAL_KEYS}


def is_model_key(key: str) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in MODEL_KEYS)


def describe_changes(changes: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    shown = [f"{key}: checkpoint {old!r}, now {new!r}" for key, (old, new) in list(changes.items())[:limit]]
    more = len(changes) - limit
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
