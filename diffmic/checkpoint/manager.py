"""Saving and restoring a run's training state. The trainer asks `choose_start` where to begin, then calls
`save()`, `save_best()` and `restore()` of its CheckpointManager; it never names a file.

Every process takes part in a save (DeepSpeed's is collective, and every process writes its own random
generators); rank 0 writes the rest. A full disk on any process removes the partial folder on all of them
and stops the run with one line, leaving the previous checkpoint as it was.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config, flatten
from ..errors import CheckpointError, DiskFullError
from . import record as ckpt
from .files import (
    Written,
    capture_rng,
    first_line,
    flatten_optimizer,
    gigabytes,
    hashing_file,
    load_tensors,
    load_weights_only,
    read_json,
    refuse,
    restore_rng,
    save_tensors,
    unflatten_optimizer,
    write_json,
)

# Settings that cannot change on an exact resume even when named in allow_changes: the weights' shapes
# and meaning (MODEL_KEYS) and the engine whose files the training state is in.
FIXED_ON_RESUME = ("train.distributed",)
HEADER_ALLOWANCE = 1 << 20  # the safetensors headers and JSON files of a checkpoint: a few kB each, 1 MiB in all


@dataclass
class Start:
    """Where a training run begins: `fresh`, `resume` (exact, from a training checkpoint) or `fine-tune`
    (weights and EMA of a weights-only checkpoint, a fresh optimiser)."""

    mode: str = "fresh"
    checkpoint: ckpt.Checkpoint | None = None
    changes: dict = field(default_factory=dict)  # {key: (checkpoint's value, this run's)} accepted
    passed_over: list[Path] = field(default_factory=list)  # newer step-N folders without a COMPLETE record

    @property
    def step(self) -> int:
        return self.checkpoint.step if self.checkpoint is not None else 0


def choose_start(run_dir: Path, config: Config, classes: list[str], manifest_sha256: str, world_size: int,
                 allow_changes: Iterable[str] = ()) -> Start:
    """The latest training checkpoint resumes exactly; without one, the latest weights-only checkpoint (an
    import, a copied `best`) starts a fine-tuning; without either, the run starts fresh."""
    allowed = check_setting_names(config, allow_changes)
    everything = ckpt.complete_checkpoints(run_dir)
    trained = [checkpoint for checkpoint in everything if checkpoint.has_training_state]
    if trained:
        # An exact resume reads every file of the checkpoint: each is checked against its sha256 first.
        checkpoint = ckpt.verify(trained[-1], read=trained[-1].files)
        changes = check_resumable(checkpoint, config, classes, manifest_sha256, world_size, allowed)
        return Start("resume", checkpoint, changes)
    candidates = everything + ([best] if (best := _best_checkpoint(run_dir)) is not None else [])
    # A save cut short between its rename and its record, or a record deleted: said by name, since what the run starts
    # from then (the best weights, or nothing) is not where its training stopped.
    passed_over = ckpt.unrecorded_folders(run_dir)
    if candidates:
        checkpoint = ckpt.verify(max(candidates, key=lambda candidate: candidate.step))
        return Start("fine-tune", checkpoint, check_fits(checkpoint, config, classes), passed_over)
    return Start(passed_over=passed_over)


def _best_checkpoint(run_dir: Path) -> ckpt.Checkpoint | None:
    step = ckpt.best_step(run_dir)
    return ckpt.read_checkpoint(ckpt.best_folder(run_dir, step)) if step is not None else None


def check_setting_names(config: Config, names: Iterable[str]) -> set[str]:
    known = set(flatten(config.to_dict()))
    names = {name.strip() for name in names if name.strip()}
    unknown = sorted(name for name in names if name not in known)
    if unknown:
        raise CheckpointError(f"--allow-changes names {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'} "
                              f"not a setting; use dotted keys such as train.lr (python -m diffmic.config lists them)")
    return names


def check_fits(checkpoint: ckpt.Checkpoint, config: Config, classes: list[str]) -> dict:
    """Refuses weights of another model or class list; returns the other settings that differ."""
    changes = ckpt.config_changes(checkpoint.config, config)
    fixed = {key: change for key, change in changes.items() if ckpt.is_model_key(key)}
    if fixed:
        raise CheckpointError(f"{checkpoint.path} was made with another configuration ({ckpt.describe_changes(fixed)}): "
                              f"its weights do not fit this model. Use the config of that run, or train into a "
                              f"new --run-dir")
    if checkpoint.classes != list(classes):
        raise CheckpointError(f"{checkpoint.path} was trained on the classes {checkpoint.classes}, but the shards hold "
                              f"{list(classes)}; use shards with those classes, or train into a new --run-dir")
    return changes


def check_resumable(checkpoint: ckpt.Checkpoint, config: Config, classes: list[str], manifest_sha256: str,
                    world_size: int, allowed: set[str]) -> dict:
    """An exact resume continues the same run: same data, same processes, same settings except those the
    user named. Returns the accepted changes."""
    changes = check_fits(checkpoint, config, classes)
    if checkpoint.manifest_sha256 != manifest_sha256:
        raise CheckpointError(f"{checkpoint.path} was trained on shards whose manifest has sha256 "
                              f"{str(checkpoint.manifest_sha256)[:12]}... ({checkpoint.shards}), but these have "
                              f"{manifest_sha256[:12]}...: the data changed since the run started. Resume on the "
                              f"shards it started with, or train into a new --run-dir")
    trained_with = checkpoint.record.get("training", {}).get("world_size")
    if trained_with != world_size:
        raise CheckpointError(f"{checkpoint.path} was written by {trained_with} process(es), and this run has "
                              f"{world_size}: the batch order and every step's global batch depend on it. Resume "
                              f"with {trained_with} process(es), or train into a new --run-dir")
    fixed = {key: change for key, change in changes.items() if key in FIXED_ON_RESUME}
    refused = {key: change for key, change in changes.items() if key not in allowed and key not in fixed}
    if fixed or refused:
        hint = (f"accept them with --allow-changes {','.join(refused)}, " if refused and not fixed else "")
        raise CheckpointError(f"{checkpoint.path} was made with another configuration "
                              f"({ckpt.describe_changes({**fixed, **refused})}). Resume with the run's own settings "
                              f"(its config.yaml), {hint}or train into a new --run-dir")
    return changes


def load_for_fine_tuning(checkpoint: ckpt.Checkpoint, model) -> dict | None:
    """Loads a weights-only checkpoint into a model not yet prepared (so DeepSpeed's fp32 copy starts
    from them); returns the EMA weights, if the checkpoint has them."""
    ckpt.load_into(model, load_tensors(checkpoint.file(ckpt.MODEL_FILE))[0], checkpoint.file(ckpt.MODEL_FILE))
    return ckpt.load_ema(checkpoint)


class CheckpointManager:
    """Owns the training checkpoints of one run on one process."""

    def __init__(self, run_dir: Path, accelerator, model, module, optimizer, ema, state, config: Config,
                 classes: list[str], provenance: dict):
        self.run_dir, self.accelerator = Path(run_dir), accelerator
        self.model, self.module, self.optimizer, self.ema, self.state = model, module, optimizer, ema, state
        self.config, self.classes, self.provenance = config, list(classes), provenance
        self.deepspeed = accelerator.distributed_type.value == "DEEPSPEED"
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.last: Path | None = None
        self.best_written: Path | None = None  # the best-N folder this process wrote last
        self.written: dict[str, Written] = {}  # the files of the save in progress this process wrote

    # --- saving -------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Collective: every process calls it. The checkpoint of the current step is written once."""
        final = ckpt.step_folder(self.run_dir, self.state.step)
        existing = ckpt.read_checkpoint(final)
        if existing is None or not existing.has_training_state:
            needed = self._expected_bytes()
            self._collectively(lambda: self._check_space(needed), final, needed)
            self._collectively(lambda: self._write_training_files(final), final, needed)
            written = self._from_every_process(self.written)
            if self.is_main:
                ckpt.finalise(ckpt.partial_folder(final), final, self._record(), written)
                self.prune()
            self.accelerator.wait_for_everyone()
        self.last = final
        return final

    def save_best(self, score: float, metric: str, split: str) -> None:
        """Collective: a weights-only copy of the current model as the run's best (rank 0 writes it)."""
        final = ckpt.best_folder(self.run_dir, self.state.step)
        weights = self.module.state_dict()
        needed = sum(value.numel() * 4 for value in weights.values())
        selection = {"metric": metric, "score": score, "split": split}

        def write() -> None:
            if not self.is_main:
                return
            self._check_space(needed)
            ckpt.write_best_checkpoint(self.run_dir, weights, self.config, self.classes, step=self.state.step,
                                       selection=selection, ema_state=self.ema.shadow if self.ema is not None else None,
                                       provenance=self.provenance)

        self._collectively(write, final, needed)
        self.best_written = final

    def _write_training_files(self, final: Path) -> None:
        partial = ckpt.partial_folder(final)
        self.written = written = {}
        if self.is_main:
            ckpt.prepare_partial(final)
            (partial / "training").mkdir()
        self.accelerator.wait_for_everyone()
        if self.deepspeed:  # collective; ZeRO partitions the optimizer state across the processes
            with hashed_deepspeed_saves(self.model, partial, written):
                self.model.save_checkpoint(str(partial / "training"), tag="deepspeed", save_latest=False)
        if self.is_main:
            for script in (partial / "training").glob("zero_to_*.py"):  # DeepSpeed's converters: no code in a run
                script.unlink()
            # The best of this very step, written moments ago from the same weights: shared by hard links.
            same = self.best_written if self.best_written == ckpt.best_folder(self.run_dir, self.state.step) else None
            written.update(ckpt.write_weights_files(partial, self.module.state_dict(),
                                                    self.ema.shadow if self.ema else None, same_as=same))
            if not self.deepspeed:
                tensors, metadata = flatten_optimizer(self.optimizer.state_dict())
                written[ckpt.OPTIMIZER_FILE] = save_tensors(partial / ckpt.OPTIMIZER_FILE, tensors, metadata)
            scaler = self.accelerator.scaler
            written[ckpt.STATE_FILE] = write_json(partial / ckpt.STATE_FILE, {
                "trainer": self.state.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None})
        tensors, metadata = capture_rng()
        written[ckpt.rng_file(self.rank)] = save_tensors(partial / ckpt.rng_file(self.rank), tensors, metadata)

    def _from_every_process(self, written: dict[str, Written]) -> dict[str, Written]:
        """Collective: what every process wrote (its random generators, its DeepSpeed partition), for the record."""
        if self.world == 1:
            return dict(written)
        from accelerate.utils import gather_object

        merged: dict[str, Written] = {}
        for part in gather_object([written]):
            merged.update(part)
        return merged

    def _record(self) -> dict:
        position = {key: getattr(self.state, key) for key in ("joint_step", "epoch", "batch_in_epoch")}
        return ckpt.new_record(ckpt.TRAINING, self.state.step, self.config, self.classes, **position,
                               provenance=self.provenance,
                               training={"engine": "deepspeed" if self.deepspeed else "ddp",
                                         "world_size": self.world})

    def prune(self) -> None:
        """Keeps the last `train.keep_last` training checkpoints; weights-only ones (imports) stay."""
        trained = [checkpoint for checkpoint in ckpt.complete_checkpoints(self.run_dir)
                   if checkpoint.has_training_state]
        for checkpoint in trained[:-self.config.train.keep_last]:
            shutil.rmtree(checkpoint.path, ignore_errors=True)

    # --- disk space ---------------------------------------------------------------------------------
    def _expected_bytes(self) -> int:
        """The tensors held now plus the last training checkpoint's other files (random generators, state), or that
        whole checkpoint where it is larger. Not the last checkpoint alone: a joint checkpoint is larger than a
        warm-up one (the denoiser's moments appear once it trains), and an estimate below the real size would let
        a save start that cannot fit."""
        trained = [c for c in ckpt.complete_checkpoints(self.run_dir) if c.has_training_state]
        last = trained[-1].record["files"] if trained else {}
        tensors = (ckpt.MODEL_FILE, ckpt.EMA_FILE, ckpt.OPTIMIZER_FILE)
        others = sum(size for name, size in last.items() if name not in tensors)
        return max(self._bytes_held_now() + others + HEADER_ALLOWANCE, sum(last.values()))

    def _bytes_held_now(self) -> int:
        weights = sum(value.numel() * 4 for value in self.module.state_dict().values())
        ema = sum(value.numel() * 4 for value in self.ema.shadow.values()) if self.ema is not None else 0
        if self.deepspeed:  # its own copy of the weights, an fp32 master copy and Adam's moments
            return weights + ema + 5 * weights
        moments = sum(value.numel() * value.element_size() for state in self.optimizer.state_dict()["state"].values()
                      for value in state.values() if isinstance(value, torch.Tensor))
        return weights + ema + moments

    def _check_space(self, needed: int) -> None:
        """Refuses to start a save that cannot fit (rank 0 looks; `_collectively` tells the others)."""
        if self.is_main:
            root = ckpt.checkpoint_root(self.run_dir)
            root.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(root).free < needed:
                raise DiskFullError("not enough free space")

    def _collectively(self, work, final: Path, needed: int) -> None:
        """Runs `work` on every process. If the disk filled up on any of them, the partial folder goes and
        every process raises the same one-line DiskFullError; the earlier checkpoints stay as they were."""
        failed = False
        try:
            work()
        except DiskFullError:
            failed = True
        if self.world > 1:
            flags = torch.tensor([float(failed)], device=self.accelerator.device)
            failed = bool(self.accelerator.reduce(flags, reduction="sum").item() > 0)
        if not failed:
            return
        root = final.parent
        if self.is_main:
            shutil.rmtree(ckpt.partial_folder(final), ignore_errors=True)
        previous = [c.name for c in ckpt.complete_checkpoints(self.run_dir) if c.has_training_state]
        kept = f"{previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        free = shutil.disk_usage(root).free if root.is_dir() else 0
        # With the partial folder gone the space it took is free again: more than `needed` free now means the disk
        # filled up from elsewhere while the checkpoint was written.
        meanwhile = " (the disk filled up while it was written)" if free >= needed else ""
        raise DiskFullError(f"disk full: saving {final.name} needs about {gigabytes(needed)} in {root}, "
                            f"{gigabytes(free)} free{meanwhile}; free some space (or lower train.keep_last) and "
                            f"run the same command again to resume; {kept}")

    # --- restoring ----------------------------------------------------------------------------------
    def restore(self, checkpoint: ckpt.Checkpoint) -> None:
        """Exact resume: weights, optimiser, EMA, position, loss scaler and this process's generators."""
        if self.deepspeed:
            self._restore_deepspeed(checkpoint)
        else:
            path = checkpoint.file(ckpt.MODEL_FILE)
            ckpt.load_into(self.module, load_tensors(path)[0], path)
            path = checkpoint.file(ckpt.OPTIMIZER_FILE)
            with _reading(path):
                self.optimizer.load_state_dict(unflatten_optimizer(*load_tensors(path)))
        if self.ema is not None:
            shadow = ckpt.load_ema(checkpoint)
            with _reading(checkpoint.file(ckpt.EMA_FILE)):
                # A run that turned the EMA on (--allow-changes train.ema) starts it from the weights.
                self.ema.load_state_dict({"rate": self.ema.rate, "shadow": shadow} if shadow is not None
                                         else type(self.ema)(self.module.denoiser, self.ema.rate).state_dict())
        path = checkpoint.file(ckpt.STATE_FILE)
        values = read_json(path)
        with _reading(path):
            self.state.load_state_dict(values["trainer"])
            if self.accelerator.scaler is not None and values.get("scaler"):
                self.accelerator.scaler.load_state_dict(values["scaler"])
        path = checkpoint.file(ckpt.rng_file(self.rank))
        with _reading(path):
            restore_rng(*load_tensors(path))
        self.last = checkpoint.path

    def _restore_deepspeed(self, checkpoint: ckpt.Checkpoint) -> None:
        """DeepSpeed reads its files itself; every read goes through a weights-only torch.load."""
        engine = self.model
        original = engine.checkpoint_engine.load
        engine.checkpoint_engine.load = lambda path, map_location=None: load_weights_only(path, map_location)
        try:
            loaded, _ = engine.load_checkpoint(str(checkpoint.path / "training"), tag="deepspeed",
                                               load_module_strict=True, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
        finally:
            engine.checkpoint_engine.load = original
        if loaded is None:
            raise refuse(checkpoint.path / ckpt.DEEPSPEED_DIR, "DeepSpeed found no engine state in it")


@contextmanager
def hashed_deepspeed_saves(engine, folder: Path, written: dict[str, Written]) -> Iterator[None]:
    """DeepSpeed writes each of its files through its checkpoint engine's `save(state_dict, path)`: here each goes
    through a HashingFile instead of a path, so its sha256 comes from the bytes as they are written."""
    original = engine.checkpoint_engine.save

    def save(state_dict, path) -> None:
        with hashing_file(Path(path)) as out:
            original(state_dict, out)
        written[Path(path).relative_to(folder).as_posix()] = out.written()

    engine.checkpoint_engine.save = save
    try:
        yield
    finally:
        engine.checkpoint_engine.save = original


@contextmanager
def _reading(path: Path):
    """Content that parses but is not what diffmic writes (wrong keys, shapes, types) names its file."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
        raise refuse(path, f"its content is not what diffmic writes ({first_line(error)})") from None
