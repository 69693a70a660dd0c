"""The training loop: DCG warm-up, then joint training of the denoiser and the DCG, on shards.

One function, `train`, runs the same way standalone, under `accelerate launch` and under Slurm. Each
step is one optimizer step of the single Adam (denoiser group + guidance group); the denoiser loss
cannot reach the DCG and the cross-entropy cannot reach the denoiser, so the two updates stay separate
with their own learning rates and clipping. Nothing in the step reads a value back to the host except
at logging steps.
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..errors import NonFiniteLossError
from ..fileio import write_json_atomic
from ..data import eval_loader, read_manifest, steps_per_epoch, train_loader
from ..data.loaders import check_compatible as check_shards
from ..evaluation.inference import check_keys, gather_predictions, predict_batches
from ..evaluation.metrics import classification_metrics, selection_score
from ..models import build_model
from . import checkpoint as ckpt
from .distributed import forward_autocast, make_accelerator, training_precision
from .optim import ExponentialMovingAverage, build_optimizer, clip_group_gradients, set_learning_rates
from .rundir import MetricsLog, write_run_files

LOSS_KEYS = ("loss", "denoiser_loss", "mse", "mmd", "guide_loss")


@dataclass
class TrainerState:
    """Where the run is; saved in every checkpoint (Accelerate calls state_dict/load_state_dict)."""

    step: int = 0  # optimizer steps, warm-up included
    joint_step: int = 0  # optimizer steps of joint training (train.max_steps counts these)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_score: float = -math.inf
    best_step: int = -1

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, values: dict) -> None:
        for key, value in values.items():
            setattr(self, key, value)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    joint_step: int
    epoch: int
    stopped_by: str  # "finished", "max_steps" or "signal"
    last_checkpoint: Path | None
    best_step: int
    best_score: float
    validation: dict = field(default_factory=dict)


class StopSignal:
    """SIGTERM / SIGUSR2 ask the run to finish its step, save and exit 0 (Slurm preemption)."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR2):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: the launcher owns signals
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, config: Config, shard_dir: str | Path, run_dir: str | Path | None, progress: bool = True,
                 facts: dict | None = None):
        self.config, self.train_cfg = config, config.train
        self.caller_facts = dict(facts or {})  # what the caller knows about the run (the config file), for run.json
        self.shard_dir = Path(shard_dir)
        self.manifest = read_manifest(self.shard_dir)
        check_shards(self.manifest, config.data)
        self.accelerator = make_accelerator(self.train_cfg)
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.run_dir = Path(run_dir) if run_dir else self._new_run_dir()
        self.micro_batches = steps_per_epoch(self.manifest, self.train_cfg.batch_size, self.world)
        if self.micro_batches < self.train_cfg.grad_accum:
            raise ValueError(f"train.grad_accum={self.train_cfg.grad_accum} exceeds the {self.micro_batches} "
                             f"batches per epoch; lower it or train.batch_size")
        # Whole accumulation groups only, so optimizer steps never straddle epochs.
        self.steps_per_epoch = self.micro_batches // self.train_cfg.grad_accum
        self.micro_batches = self.steps_per_epoch * self.train_cfg.grad_accum
        self.total_epochs = self.train_cfg.dcg_warmup_epochs + self.train_cfg.epochs
        self.select_split = self.train_cfg.select_split
        if self.train_cfg.val_every and self.select_split not in self.manifest.splits:
            # Found now, not after the first epochs: a small dataset can round its val share to nothing.
            raise ConfigError("train.select_split", f"{self.shard_dir} has no '{self.select_split}' split to "
                              f"validate on (splits: {', '.join(self.manifest.splits)}); re-shard with a larger "
                              f"--val-fraction, or set train.val_every=0")
        from accelerate.utils import set_seed

        set_seed(self.train_cfg.seed)
        model = build_model(config)
        model.check_values = acc.device.type == "cpu"  # value checks would sync an accelerator each step
        optimizer = build_optimizer(model, self.train_cfg)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.module = acc.unwrap_model(self.model)
        # After prepare: every rank holds rank 0's initial weights, so every EMA starts equal.
        self.ema = (ExponentialMovingAverage(self.module.denoiser, self.train_cfg.ema_rate)
                    if self.train_cfg.ema and self.module.denoiser is not None else None)
        self.state = TrainerState()
        acc.register_for_checkpointing(self.state, *([self.ema] if self.ema else []))
        # Different ranks draw different timesteps and noise.
        set_seed(self.train_cfg.seed, device_specific=True)
        self.is_main = acc.is_main_process
        self.log = MetricsLog(self.run_dir, self.is_main, self.train_cfg.tensorboard)
        self.show_progress = progress and self.is_main
        self.last_checkpoint: Path | None = None
        self.last_validation: dict = {}

    # --- set-up -------------------------------------------------------------------------------------
    def prepare_run(self) -> None:
        acc = self.accelerator
        global_batch = self.train_cfg.batch_size * self.world * self.train_cfg.grad_accum
        mixed_precision = training_precision(acc)
        precision = "fp32" if mixed_precision == "no" else mixed_precision
        if self.is_main:
            facts = {"world_size": self.world, "global_batch": global_batch,
                     "batch_per_device": self.train_cfg.batch_size, "grad_accum": self.train_cfg.grad_accum,
                     "mixed_precision": mixed_precision, "distributed": acc.distributed_type.value,
                     "steps_per_epoch": self.steps_per_epoch, "select_split": self.select_split, **self.caller_facts}
            self.provenance = write_run_files(self.run_dir, self.config, self.manifest, facts)
            ckpt.remove_partials(self.run_dir)
            self.print(f"run {self.run_dir}: {self.world} process(es) on {acc.device}, {precision} "
                       f"precision, global batch {global_batch} ({self.train_cfg.batch_size} per device x "
                       f"{self.world} x {self.train_cfg.grad_accum} accumulation), {self.steps_per_epoch} "
                       f"steps per epoch" + (f"; config {facts['config_file']}" if "config_file" in facts else ""))
            if self.select_split == "test":
                self.print("[bold yellow]model selection uses the TEST split (the authors' protocol): "
                           "its test scores are optimistic[/]")
        acc.wait_for_everyone()
        self.provenance = self._broadcast_provenance()

    def _broadcast_provenance(self) -> dict:
        return self._from_rank_zero(getattr(self, "provenance", None))

    def _from_rank_zero(self, value):
        from accelerate.utils import broadcast_object_list

        holder = [value]
        if self.world > 1:
            broadcast_object_list(holder)
        return holder[0]

    def _new_run_dir(self) -> Path:
        """runs/<dataset>-<time>, chosen by rank 0 so that every process writes to the same folder."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return Path(self._from_rank_zero(f"runs/{self.config.data.dataset}-{stamp}"))

    def resume(self) -> bool:
        """Continues from the latest complete checkpoint of the run folder, if there is one."""
        available = ckpt.complete_checkpoints(self.run_dir)
        if not available:
            return False
        info = available[-1]
        ckpt.check_compatible(info, self.config, self.manifest.classes)
        self.accelerator.load_state(str(info.path))
        self.last_checkpoint = info.path
        self.print(f"resumed from {info.path} (step {self.state.step}, epoch {self.state.epoch}, "
                   f"batch {self.state.batch_in_epoch})")
        return True

    def print(self, message: str) -> None:
        if self.is_main:
            from rich.console import Console

            Console(stderr=True).print(message, highlight=False)

    # --- the loop -----------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        stopped_by = "finished"
        with StopSignal() as stop, self._progress() as progress:
            while self.state.epoch < self.total_epochs:
                outcome = self._run_epoch(stop, progress)
                if outcome != "epoch":
                    stopped_by = outcome
                    break
        if (stopped_by != "signal" and self.train_cfg.val_every and self.state.joint_step > 0
                and not self._validated_at_step()):
            self._validate()
        self.save_checkpoint()
        self.log.close()
        return TrainResult(self.run_dir, self.state.step, self.state.joint_step, self.state.epoch, stopped_by,
                           self.last_checkpoint, self.state.best_step, self.state.best_score, self.last_validation)

    def _joint(self, epoch: int) -> bool:
        return self.module.denoiser is None or epoch >= self.train_cfg.dcg_warmup_epochs

    def _validated_at_step(self) -> bool:
        return self.last_validation.get("step") == self.state.step

    def _run_epoch(self, stop: StopSignal, progress) -> str:
        acc, cfg, state = self.accelerator, self.train_cfg, self.state
        epoch, joint = state.epoch, self._joint(state.epoch)
        loader = train_loader(self.shard_dir, self.config.data, cfg.batch_size, cfg.seed, epoch, self.rank,
                              self.world, start_batch=state.batch_in_epoch)
        sums = torch.zeros(len(LOSS_KEYS), device=acc.device)
        first_bad = torch.full((), -1, device=acc.device, dtype=torch.long)
        timer = time.perf_counter()
        images_since_log = 0
        for batch in loader:
            if state.batch_in_epoch >= self.micro_batches:
                break
            batch = {"image": batch["image"].to(acc.device, non_blocking=True),
                     "label": batch["label"].to(acc.device, non_blocking=True), "key": batch["key"]}
            with acc.accumulate(self.model):
                losses = self.model(batch, train_denoiser=joint and self.module.denoiser is not None)
                acc.backward(losses["loss"])  # Accelerate divides by the accumulation steps
                if acc.sync_gradients:
                    set_learning_rates(self.optimizer, cfg, self._joint_epochs(epoch) if joint else -1.0)
                    if acc.distributed_type.value != "DEEPSPEED":  # DeepSpeed clips inside its step
                        acc.unscale_gradients()
                        clip_group_gradients(self.optimizer)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch += 1
            images_since_log += len(batch["key"])
            sums += torch.stack([losses.get(key, losses["loss"].new_zeros(())).detach().float() for key in LOSS_KEYS])
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(losses["loss"].detach()),
                                    torch.full_like(first_bad, state.step + 1), first_bad)
            if not acc.sync_gradients:
                continue
            state.step += 1
            state.joint_step += int(joint)
            if self.ema is not None and joint:
                self.ema.update(self.module.denoiser)
            progress.advance(state.step)
            at_log = state.step % cfg.log_every == 0
            must_stop = stop.requested if self.world == 1 else False
            if at_log or must_stop:
                must_stop = self._log_interval(sums, first_bad, epoch, joint, timer, images_since_log, stop, progress)
                sums.zero_()
                timer, images_since_log = time.perf_counter(), 0
            if must_stop:
                self.save_checkpoint()
                return "signal"
            if cfg.max_steps and state.joint_step >= cfg.max_steps:
                return "max_steps"
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        self._end_of_epoch(epoch, joint)
        return "epoch"

    def _joint_epochs(self, epoch: int) -> float:
        """Progress of joint training in epochs, for the denoiser's learning-rate schedule."""
        done = epoch - (self.train_cfg.dcg_warmup_epochs if self.module.denoiser is not None else 0)
        return done + self.state.batch_in_epoch / self.micro_batches

    def _log_interval(self, sums, first_bad, epoch, joint, timer, images, stop, progress) -> bool:
        """The one place the loop reads values back: losses, the non-finite check, the stop flag."""
        acc = self.accelerator
        never = float(2**62)
        flags = torch.stack([torch.where(first_bad >= 0, first_bad.double(), torch.full((), never, device=acc.device,
                                                                                        dtype=torch.float64)),
                             torch.tensor(float(stop.requested), device=acc.device, dtype=torch.float64)])
        reduced = acc.reduce(sums.clone(), reduction="mean")
        if self.world > 1:  # any rank's NaN stops all; any rank's signal stops all, at the same step
            every = acc.gather(flags.unsqueeze(0))
            flags = torch.stack([every[:, 0].min(), every[:, 1].max()])
        bad_step, stop_requested = flags.tolist()
        if bad_step < never:
            last = self.last_checkpoint or "none (nothing saved yet)"
            raise NonFiniteLossError(f"the training loss became non-finite at step {int(bad_step)}; "
                                     f"last good checkpoint: {last}. Lower train.lr or use "
                                     f"train.mixed_precision=bf16/no instead of fp16")
        interval = self.state.step % self.train_cfg.log_every or self.train_cfg.log_every
        means = (reduced / max(interval * self.train_cfg.grad_accum, 1)).tolist()
        seconds = max(time.perf_counter() - timer, 1e-9)
        row = {"step": self.state.step, "joint_step": self.state.joint_step, "epoch": epoch,
               "phase": "joint" if joint else "dcg_warmup",
               **{key: value for key, value in zip(LOSS_KEYS, means) if value or key == "loss"},
               "lr_denoiser": self.optimizer.param_groups[0]["lr"], "lr_guide": self.optimizer.param_groups[1]["lr"],
               "images_per_s": images * self.world / seconds}
        self.log.write(row)
        progress.describe(row)
        return bool(stop_requested)

    def _end_of_epoch(self, epoch: int, joint: bool) -> None:
        cfg = self.train_cfg
        last_epoch = epoch + 1 == self.total_epochs
        joint_epochs_done = epoch + 1 - (cfg.dcg_warmup_epochs if self.module.denoiser is not None else 0)
        if joint and cfg.val_every and (last_epoch or joint_epochs_done % cfg.val_every == 0):
            self._validate()
        if last_epoch or (epoch + 1) % cfg.checkpoint_every == 0:
            self.save_checkpoint()

    # --- validation and checkpoints -----------------------------------------------------------------
    def _validate(self) -> dict:
        """Samples the selection split on every process, gathers once, scores on every process (so
        all agree on whether this is the best checkpoint)."""
        acc, eval_cfg = self.accelerator, self.config.eval
        split = self.select_split
        loader = eval_loader(self.shard_dir, split, self.config.data, eval_cfg.batch_size, self.rank, self.world)
        ema = self.ema.swapped_into(self.module.denoiser) if (self.ema and eval_cfg.use_ema) else nullcontext()
        started = time.perf_counter()
        with ema:
            local = predict_batches(self.module, loader, acc.device, self.train_cfg.seed, eval_cfg.steps,
                                    eval_cfg.sampler, eval_cfg.n_samples, eval_cfg.aggregate,
                                    autocast=forward_autocast(acc))
        predictions = gather_predictions(local, acc)
        check_keys(predictions, self.manifest.split_info(split).keys, split)
        metrics = classification_metrics(predictions.labels, predictions.probs, class_names=self.manifest.classes)
        guide = classification_metrics(predictions.labels, predictions.guide_probs, class_names=self.manifest.classes)
        score = selection_score(metrics, self.train_cfg.select_metric)
        improved = score > self.state.best_score
        row = {"step": self.state.step, "epoch": self.state.epoch, "split": split,
               f"{split}/accuracy": metrics["accuracy"], f"{split}/macro_f1": metrics["macro_f1"],
               f"{split}/kappa": metrics["kappa_quadratic"], f"{split}/dcg_accuracy": guide["accuracy"],
               f"{split}/seconds": time.perf_counter() - started, "selection_score": score, "best": improved}
        self.log.write(row)
        self.print(f"step {self.state.step} {split}: accuracy {metrics['accuracy']:.4f}, macro F1 "
                   f"{metrics['macro_f1']:.4f} (DCG accuracy {guide['accuracy']:.4f})" + (" [new best]" if improved else ""))
        self.last_validation = row
        if improved:
            self.state.best_score, self.state.best_step = score, self.state.step
            self.save_checkpoint()
            if self.is_main:
                write_json_atomic(ckpt.checkpoint_root(self.run_dir) / ckpt.BEST_FILE,
                                       {"step": self.state.step, "metric": self.train_cfg.select_metric,
                                        "score": score, "split": split})
        return row

    def save_checkpoint(self) -> Path:
        """Collective: every process calls it. A checkpoint of the current step is written once."""
        acc = self.accelerator
        final = ckpt.checkpoint_root(self.run_dir) / f"step-{self.state.step}"
        if (final / ckpt.MARKER).is_file():
            self.last_checkpoint = final
            return final
        partial = ckpt.checkpoint_root(self.run_dir) / f".step-{self.state.step}.partial"
        if self.is_main:
            ckpt.prepare_folder(self.run_dir, self.state.step)
        acc.wait_for_everyone()
        acc.save_state(str(partial))
        if self.is_main:
            meta = {"step": self.state.step, "joint_step": self.state.joint_step, "epoch": self.state.epoch,
                    "batch_in_epoch": self.state.batch_in_epoch, "config": ckpt.dump_config(self.config),
                    **self.provenance}
            payload = ckpt.model_payload(self.module, self.ema, self.config, self.manifest.classes, {"meta": meta})
            torch.save(payload, partial / ckpt.MODEL_FILE)
            # Fault injection for the crash-safety test: widens the window in which a kill lands mid-save.
            time.sleep(float(os.environ.get("DIFFMIC_FAULT_SAVE_DELAY_S", "0")))
        acc.wait_for_everyone()
        if self.is_main:
            ckpt.finalise(partial, final, meta)
            ckpt.prune(self.run_dir, self.train_cfg.keep_last)
        acc.wait_for_everyone()
        self.last_checkpoint = final
        return final

    # --- progress -----------------------------------------------------------------------------------
    def _progress(self):
        total = self.total_epochs * self.steps_per_epoch
        if self.train_cfg.max_steps:
            warmup = self.train_cfg.dcg_warmup_epochs * self.steps_per_epoch if self.module.denoiser is not None else 0
            total = min(total, warmup + self.train_cfg.max_steps)
        return TrainProgress(total, self.state.step, self.show_progress)


class TrainProgress:
    """A rich progress bar with loss, learning rate, images/s and ETA, on rank 0 only."""

    def __init__(self, total: int, completed: int, enabled: bool):
        self.enabled, self.total, self.completed = enabled, total, completed

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[status]}"), transient=False)
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.total, completed=self.completed, status="")
        return self

    def advance(self, step: int) -> None:
        if self.enabled:
            self.bar.update(self.task, completed=step)

    def describe(self, row: dict) -> None:
        if self.enabled:
            self.bar.update(self.task, status=f"{row['phase']} loss {row['loss']:.4f} lr {row['lr_denoiser']:.2e}/"
                                              f"{row['lr_guide']:.2e} {row['images_per_s']:.1f} img/s")

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)


def train(config: Config, shard_dir: str | Path, run_dir: str | Path | None = None, resume: bool = True,
          progress: bool = True, facts: dict | None = None) -> TrainResult:
    """Trains (or resumes) a run; the same call for one process or many. `facts` (such as the config file
    the command line read) are recorded in run.json."""
    trainer = Trainer(config, shard_dir, run_dir, progress, facts)
    try:
        trainer.prepare_run()
        if resume:
            trainer.resume()
        return trainer.fit()
    finally:
        trainer.accelerator.end_training()
