"""The training loop: DCG warm-up, then joint training of the denoiser and the DCG, on shards.

One function, `train`, runs the same way standalone, under `accelerate launch` and under Slurm. The loop
is short: a `TrainStep` per micro-batch, a `LossMeter` flushed at logging steps, a `Validator` at the
validation epochs, and a `CheckpointManager` whose `CheckpointPolicy` says when to save.
"""

from __future__ import annotations

import math
import signal
import socket
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..checkpoint import (
    MARKER,
    CheckpointManager,
    CheckpointPolicy,
    Start,
    best_record,
    choose_start,
    complete_checkpoints,
    load_for_fine_tuning,
    remove_partials,
    without_pretrained,
)
from ..config import Config, ConfigError
from ..data import as_location, read_manifest, steps_per_epoch, train_loader
from ..data.loaders import check_compatible as check_shards
from ..data.verify import check_shard_files
from ..errors import NonFiniteLossError, PretrainedWeightsError
from ..models import build_model
from ..models.pretrained import WeightsRequest, fetch_all
from ..progress import ProgressBar
from ..run import MetricsLog, RunFolder, RunLock, provenance, tracker_parameters
from .distributed import training_accelerator, training_precision
from .optim import ExponentialMovingAverage, build_optimizer
from .step import LossMeter, TrainStep
from .validate import Validator


@dataclass
class TrainerState:
    """Where the run is; saved in every training checkpoint."""

    step: int = 0  # optimizer steps, warm-up included (a fine-tuning continues its source's count)
    joint_step: int = 0  # optimizer steps of joint training (train.max_steps counts these)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_score: float = -math.inf
    best_step: int = -1
    start_step: int = 0  # the step this training began at (0, or the fine-tuned checkpoint's)

    def state_dict(self) -> dict:
        values = asdict(self)
        values["best_score"] = None if self.best_score == -math.inf else self.best_score  # plain JSON
        return values

    def load_state_dict(self, values: dict) -> None:
        names = {f.name for f in fields(self)}
        if not isinstance(values, dict) or not set(values) <= names:
            raise ValueError(f"expected the fields {sorted(names)}")
        for key, value in values.items():
            if key == "best_score":
                value = -math.inf if value is None else float(value)
            elif not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{key} is not an integer")
            setattr(self, key, value)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    joint_step: int
    epoch: int
    stopped_by: str  # "finished", "max_steps", "signal", or "already finished" (nothing left to train)
    last_checkpoint: Path | None
    best_step: int
    best_score: float
    validation: dict = field(default_factory=dict)
    processes: int = 1

    def summary(self, select_metric: str) -> str:
        """The line a training command ends with."""
        text = (f"{self.stopped_by} at step {self.step} (epoch {self.epoch}) with {self.processes} process(es); "
                f"run folder {self.run_dir}")
        if self.best_step >= 0:
            text += f"; best {select_metric} {self.best_score:.4f} at step {self.best_step}"
        return text


# How the caller's facts read in the run banner (run.json keeps the keys as they are).
BANNER_LABELS = {"config_file": "config", "hosts": "ranks on"}

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
                 resume: bool = True, allow_changes: Iterable[str] = (), facts: dict | None = None):
        self.config, self.train_cfg = config, config.train
        self.shard_dir = as_location(shard_dir)  # a URL stays a string
        self.manifest = read_manifest(self.shard_dir)
        check_shards(self.manifest, config.data)
        # Every shard the run reads (training, validation, and the test split it is evaluated on), checked against
        # its sha256 now: a damaged validation shard is found before the warm-up, not at the first validation.
        for split in self.manifest.splits:
            check_shard_files(self.manifest, self.manifest.split_info(split).shards)
        self.accelerator = acc = training_accelerator(self.train_cfg)
        self.rank, self.world, self.is_main = acc.process_index, acc.num_processes, acc.is_main_process
        self.lock: RunLock | None = None
        try:
            self.starting_weights = self._fetch_starting_weights(run_dir)
            self.folder = RunFolder(run_dir) if run_dir else self._new_run_folder()
            self.run_dir = self.folder.path
            self._take_lock()
            # The run's bookkeeping must read before anything is written: a damaged run.json or metrics.jsonl (or a
            # link in its place) is refused now, not found half-way through a session's first writes.
            self.folder.read_record()
            MetricsLog(self.folder, True).check()
            self._set_up(progress, resume, allow_changes, dict(facts or {}))
        except BaseException:
            self.close()
            raise

    def _set_up(self, progress: bool, resume: bool, allow_changes: Iterable[str], facts: dict) -> None:
        acc, cfg = self.accelerator, self.train_cfg
        self.micro_batches = steps_per_epoch(self.manifest, cfg.batch_size, self.world, self.config.data.fold)
        if self.micro_batches < cfg.grad_accum:
            raise ValueError(f"train.grad_accum={cfg.grad_accum} exceeds the {self.micro_batches} "
                             f"batches per epoch; lower it or train.batch_size")
        # Whole accumulation groups only, so optimizer steps never straddle epochs.
        self.steps_per_epoch = self.micro_batches // cfg.grad_accum
        self.micro_batches = self.steps_per_epoch * cfg.grad_accum
        self.total_epochs = cfg.dcg_warmup_epochs + cfg.epochs
        if cfg.val_every and not self.manifest.has_split(cfg.select_split, self.config.data.fold):
            # Found now, not after the first epochs: a small dataset can round its val share to nothing.
            raise ConfigError("train.select_split", f"{self.shard_dir} has no '{cfg.select_split}' split to "
                              f"validate on (splits: {', '.join(self.manifest.splits)}); re-shard with a larger "
                              f"--val-fraction, or set train.val_every=0")
        from accelerate.utils import set_seed

        self.start = (choose_start(self.run_dir, self.config, self.manifest.classes, self.manifest.digest, self.world,
                                   allow_changes) if resume else Start())
        set_seed(cfg.seed)
        # Weights from a checkpoint replace any pretrained ones: no ImageNet file is read for a resume.
        model = build_model(without_pretrained(self.config) if self.start.checkpoint else self.config)
        model.check_values = acc.device.type == "cpu"  # value checks would sync an accelerator each step
        ema_weights = load_for_fine_tuning(self.start.checkpoint, model) if self.start.mode == "fine-tune" else None
        self.model, self.optimizer = acc.prepare(model, build_optimizer(model, cfg))
        self.module = acc.unwrap_model(self.model)
        # After prepare: every rank holds rank 0's initial weights, so every EMA starts equal.
        self.ema = (ExponentialMovingAverage(self.module.denoiser, cfg.ema_rate)
                    if cfg.ema and self.module.denoiser is not None else None)
        if self.ema is not None and ema_weights is not None:
            self.ema.load_state_dict({"rate": cfg.ema_rate, "shadow": ema_weights})
        self.state = TrainerState(step=self.start.step, start_step=self.start.step) \
            if self.start.mode == "fine-tune" else TrainerState()
        # Different ranks draw different timesteps and noise.
        set_seed(cfg.seed, device_specific=True)
        self.provenance = self._from_rank_zero(provenance(self.manifest) if self.is_main else None)
        self.facts = facts
        self.checkpoints = CheckpointManager(self.run_dir, acc, self.model, self.module, self.optimizer, self.ema,
                                             self.state, self.config, self.manifest.classes, self.provenance)
        self.policy = CheckpointPolicy.from_setting(cfg.checkpoint_every)
        self.train_step = TrainStep(acc, self.model, self.module, self.optimizer, cfg)
        self.validator = Validator(acc, self.shard_dir, self.manifest, self.config)
        self.log = MetricsLog(self.folder, self.is_main, acc)
        self.show_progress = progress and self.is_main
        self.last_checkpoint: Path | None = None
        self.last_validation: dict = {}

    # --- set-up -------------------------------------------------------------------------------------
    def _take_lock(self) -> None:
        """Rank 0 locks the run folder; every rank learns the outcome, so all stop together."""
        problem = None
        if self.is_main:
            self.lock = RunLock(self.folder)
            try:
                self.lock.acquire()
            except Exception as error:  # RunLockError, or an unwritable folder
                problem = error
        problem = self._from_rank_zero(problem)
        if problem is not None:
            raise problem

    def prepare_run(self) -> None:
        acc, cfg = self.accelerator, self.train_cfg
        global_batch = cfg.batch_size * self.world * cfg.grad_accum
        mixed_precision = training_precision(acc)
        precision = "fp32" if mixed_precision == "no" else mixed_precision
        # Every rank has read its own checkpoint files (rng-<rank>, its DeepSpeed partition) before rank 0 writes:
        # a file only rank 1 reads and refuses must not leave a session in run.json or cut metrics.jsonl.
        acc.wait_for_everyone()
        self.facts["hosts"] = self._rank_hosts()
        if self.is_main:
            facts = {"world_size": self.world, "global_batch": global_batch, "batch_per_device": cfg.batch_size,
                     "grad_accum": cfg.grad_accum, "mixed_precision": mixed_precision,
                     "distributed": acc.distributed_type.value, "steps_per_epoch": self.steps_per_epoch,
                     "select_split": cfg.select_split, **self.facts}
            self.folder.write_record(self.config, self.provenance, facts, self._session())
            self._start_trackers(facts)
            remove_partials(self.run_dir)
            cut = self.log.cut_after(self.start.step)
            extra = "".join(f", {BANNER_LABELS.get(key, key)} {value}" for key, value in self.facts.items())
            self.print(f"run {self.run_dir}: {self.world} process(es) on {acc.device}, {precision} precision, "
                       f"global batch {global_batch} ({cfg.batch_size} per device x {self.world} x {cfg.grad_accum} "
                       f"accumulation), {self.steps_per_epoch} steps per epoch, checkpoints "
                       f"{self.policy.describe()}{extra}")
            self._say_how_it_starts(cut)
            if self.start.checkpoint is None:
                for request in self.starting_weights:
                    self.print(request.describe())
            if cfg.select_split == "test":
                self.print("[bold yellow]model selection uses the TEST split (the authors' protocol): "
                           "its test scores are optimistic[/]")
        acc.wait_for_everyone()

    def _rank_hosts(self) -> str:
        """`0:node-a 1:node-b`: where each rank runs, for the banner and run.json (a multi-node run started by hand,
        with torchrun or accelerate, has no other record of it). Collective."""
        from accelerate.utils import gather_object

        hosts = gather_object([socket.gethostname()]) if self.world > 1 else [socket.gethostname()]
        return " ".join(f"{rank}:{host}" for rank, host in enumerate(hosts))

    def _session(self) -> dict:
        session = {"mode": self.start.mode, "processes": self.world}
        if self.start.checkpoint is not None:
            session["from"] = {"checkpoint": str(self.start.checkpoint.path), "step": self.start.step}
        if self.start.changes:
            session["changes"] = {key: list(change) for key, change in self.start.changes.items()}
        if self.start.mode == "fine-tune":
            session["fine_tuned_from"] = session["from"]
        return session

    def _say_how_it_starts(self, cut_rows: int) -> None:
        start = self.start
        for folder in start.passed_over:
            self.print(f"[bold yellow]warning:[/] {folder / MARKER} is missing (a save cut short, or the file "
                       f"deleted): {folder.name} is not used")
        if start.mode == "fine-tune":
            ema = " and EMA" if start.checkpoint.has_ema and self.ema is not None else ""
            self.print(f"fine-tuning from the weights{ema} of {start.checkpoint.path} (step {start.step}; it holds "
                       f"no training state): a fresh optimiser, the schedule from epoch 0")
        if start.changes and start.mode == "resume":
            self.print("settings changed on resume (--allow-changes): " +
                       "; ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in start.changes.items()))
        if cut_rows:
            self.print(f"metrics.jsonl: {cut_rows} row(s) logged after step {start.step} by the interrupted "
                       f"session removed (they are trained again)")

    def _fetch_starting_weights(self, run_dir: str | Path | None) -> list[WeightsRequest]:
        """The ImageNet/state-dict files a new run's trunks start from, on this machine before anything is
        written (a run with checkpoints starts from those instead). Rank 0 downloads what is missing, so the
        other ranks find it cached; a file that cannot be had stops every rank with one message."""
        if run_dir is not None and complete_checkpoints(run_dir):
            return []
        requests, problem = [], None
        if self.is_main:
            try:
                requests = fetch_all(self.config)
            except PretrainedWeightsError as error:
                problem = error
        problem = self._from_rank_zero(problem)
        if problem is not None:
            raise problem
        return requests

    def _from_rank_zero(self, value):
        from accelerate.utils import broadcast_object_list

        holder = [value]
        if self.world > 1:
            broadcast_object_list(holder)
        return holder[0]

    def _new_run_folder(self) -> RunFolder:
        """A new run's folder, named by rank 0 so that every process writes to the same folder."""
        return RunFolder(self._from_rank_zero(str(RunFolder.new(self.config.data.dataset).path)))

    def resume(self) -> bool:
        """Continues exactly from the latest training checkpoint, if `choose_start` picked one."""
        if self.start.mode != "resume":
            return False
        self.checkpoints.restore(self.start.checkpoint)
        self.last_checkpoint = self.start.checkpoint.path
        self.print(f"resumed from {self.start.checkpoint.path} (step {self.state.step}, epoch {self.state.epoch}, "
                   f"batch {self.state.batch_in_epoch})")
        return True

    def finished(self) -> bool:
        """Whether the checkpoint it starts from already ends the schedule (epochs or train.max_steps)."""
        position = self.start.checkpoint.position if self.start.mode == "resume" else None
        if position is None:
            return False
        max_steps = self.train_cfg.max_steps
        return position["epoch"] >= self.total_epochs or bool(max_steps and position["joint_step"] >= max_steps)

    def already_finished(self) -> TrainResult:
        checkpoint, position = self.start.checkpoint, self.start.checkpoint.position
        self.print(f"{self.run_dir} already finished at step {position['step']} (epoch {position['epoch']}); "
                   f"nothing to train. Evaluate it with `diffmic eval --run {self.run_dir}`, or train further by "
                   f"raising train.epochs or train.max_steps with --allow-changes")
        best = best_record(self.run_dir) or {"step": -1, "score": -math.inf}
        return TrainResult(self.run_dir, position["step"], position["joint_step"], position["epoch"],
                           "already finished", checkpoint.path, int(best["step"]),
                           math.nan if best.get("score") is None else float(best["score"]),  # None: imported
                           processes=self.world)

    def print(self, message: str) -> None:
        if self.is_main:
            from rich.console import Console

            # soft_wrap: a log line keeps its paths whole (a folded path cannot be copied or grepped).
            Console(stderr=True).print(message, highlight=False, soft_wrap=True)

    def _start_trackers(self, facts: dict) -> None:
        """train.log_with's trackers, with the config and provenance as hyper-parameters: TensorBoard writes
        to RUN/tensorboard/, MLflow and the others where their own settings say (MLFLOW_TRACKING_URI, ...)."""
        if not self.train_cfg.log_with:
            return
        project = self.accelerator.project_configuration
        project.set_directories(str(self.run_dir))
        project.logging_dir = str(self.folder.tensorboard)
        self.accelerator.init_trackers(f"diffmic-{self.config.data.dataset}",
                                       config=tracker_parameters(self.config, self.provenance, facts),
                                       init_kwargs={"mlflow": {"run_name": self.run_dir.name},
                                                    "wandb": {"name": self.run_dir.name}})
        self.print(f"logging to {', '.join(self.train_cfg.log_with)} as well as {self.log.path}")

    def close(self) -> None:
        """Releases the run folder and ends the process group; safe to call more than once."""
        try:
            if self.lock is not None:
                self.lock.release()
        finally:
            self.accelerator.end_training()

    # --- the loop -----------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        stopped_by = "finished"
        with StopSignal() as stop, self._progress() as bar:
            while self.state.epoch < self.total_epochs:
                outcome = self._run_epoch(stop, bar)
                if outcome != "epoch":
                    stopped_by = outcome
                    break
        if (stopped_by != "signal" and self.train_cfg.val_every and self.state.joint_step > 0
                and self.last_validation.get("step") != self.state.step):
            self._validate()
        self._save()
        self.log.close()
        self._draw_curves()
        return TrainResult(self.run_dir, self.state.step, self.state.joint_step, self.state.epoch, stopped_by,
                           self.last_checkpoint, self.state.best_step, self.state.best_score, self.last_validation,
                           self.world)

    def _draw_curves(self) -> None:
        """RUN/curves.png at the end of every session (`diffmic report RUN` draws it at any time)."""
        if not self.is_main:
            return
        from ..evaluation.curves import draw_run_curves

        try:
            path = draw_run_curves(self.folder)
        except OSError as error:  # the run trained and saved: a picture that cannot be written is not worth failing
            from rich.markup import escape

            self.print(f"[bold yellow]warning:[/] {escape(str(self.folder.curves_file))} not drawn ({error.strerror}); "
                       f"draw it later with `diffmic report {escape(str(self.run_dir))}`")
            return
        except ValueError:  # nothing logged yet (a run stopped before its first logging interval)
            return
        self.print(f"training curves: {path}")

    def _joint(self, epoch: int) -> bool:
        return self.module.denoiser is None or epoch >= self.train_cfg.dcg_warmup_epochs

    def _run_epoch(self, stop: StopSignal, bar: ProgressBar) -> str:
        cfg, state = self.train_cfg, self.state
        epoch, joint = state.epoch, self._joint(state.epoch)
        loader = train_loader(self.shard_dir, self.config.data, cfg.batch_size, cfg.seed, epoch, self.rank,
                              self.world, start_batch=state.batch_in_epoch)
        meter = LossMeter(self.accelerator.device)
        for batch in loader:
            if state.batch_in_epoch >= self.micro_batches:
                break
            losses = self.train_step(batch, joint, self._joint_epochs(epoch))
            state.batch_in_epoch += 1
            meter.add(losses, state.step + 1, len(batch["key"]))
            if not self.train_step.stepped:
                continue
            state.step += 1
            state.joint_step += int(joint)
            if self.ema is not None and joint:
                self.ema.update(self.module.denoiser)
            bar.update(completed=state.step - state.start_step)
            outcome = self._after_step(meter, stop, bar, epoch, joint)
            if outcome is not None:
                return outcome
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        self._end_of_epoch(epoch, joint)
        return "epoch"

    def _after_step(self, meter: LossMeter, stop: StopSignal, bar: ProgressBar, epoch: int, joint: bool) -> str | None:
        """Logging, stop signals and checkpoints after an optimizer step; a reason to stop, or None."""
        cfg, state = self.train_cfg, self.state
        stop_now, save_now = False, self.policy.due_after_step(state.step)
        # One process reads its own flag every step; several agree on it (and on a timed save) at log steps.
        if state.step % cfg.log_every == 0 or (self.world == 1 and stop.requested):
            stop_now, timed = self._log_interval(meter, stop, bar, epoch, joint)
            save_now = save_now or timed
        if stop_now:
            self._save()
            return "signal"
        if save_now:
            self._save()
        if cfg.max_steps and state.joint_step >= cfg.max_steps:
            return "max_steps"
        return None

    def _joint_epochs(self, epoch: int) -> float:
        """Progress of joint training in epochs, for the denoiser's learning-rate schedule."""
        done = epoch - (self.train_cfg.dcg_warmup_epochs if self.module.denoiser is not None else 0)
        return done + self.state.batch_in_epoch / self.micro_batches

    def _log_interval(self, meter: LossMeter, stop: StopSignal, bar: ProgressBar, epoch: int,
                      joint: bool) -> tuple[bool, bool]:
        """The one place the loop reads values back: losses, the non-finite check, stop and timed saves."""
        interval, bad_step = meter.flush(self.accelerator, stop.requested, self.policy.due_by_time())
        if bad_step is not None:
            last = self.last_checkpoint or "none (nothing saved yet)"
            raise NonFiniteLossError(f"the training loss became non-finite at step {bad_step}; "
                                     f"last good checkpoint: {last}. Lower train.lr or use "
                                     f"train.mixed_precision=bf16/no instead of fp16")
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        row = {"step": self.state.step, "joint_step": self.state.joint_step, "epoch": epoch,
               "phase": "joint" if joint else "dcg_warmup", **interval.means, "lr_denoiser": lrs[0],
               "lr_dcg": lrs[1], "images_per_s": interval.images_per_s}
        self.log.write(row)
        bar.status(f"{row['phase']} loss {row['loss']:.4f} lr {lrs[0]:.2e}/{lrs[1]:.2e} "
                   f"{row['images_per_s']:.1f} img/s")
        return interval.stop, interval.save_due

    def _end_of_epoch(self, epoch: int, joint: bool) -> None:
        cfg = self.train_cfg
        last_epoch = epoch + 1 == self.total_epochs
        joint_epochs_done = epoch + 1 - (cfg.dcg_warmup_epochs if self.module.denoiser is not None else 0)
        if joint and cfg.val_every and (last_epoch or joint_epochs_done % cfg.val_every == 0):
            self._validate()
        if self.policy.due_after_epoch(epoch + 1, last_epoch):
            self._save()

    # --- validation and checkpoints -----------------------------------------------------------------
    def _validate(self) -> dict:
        result = self.validator(self.module, self.ema, self.state.step, self.state.epoch)
        improved = result.score > self.state.best_score
        row = {**result.row, "best": improved}
        self.log.write(row)
        self.print(result.summary() + (" [new best]" if improved else ""))
        self.last_validation = row
        if improved:
            self.state.best_score, self.state.best_step = result.score, self.state.step
            self.checkpoints.save_best(result.score, self.train_cfg.select_metric, self.validator.split)
        return row

    def _save(self) -> Path:
        """Collective: every process calls it."""
        self.last_checkpoint = self.checkpoints.save()
        self.policy.saved()
        return self.last_checkpoint

    def _progress(self) -> ProgressBar:
        cfg = self.train_cfg
        total = self.total_epochs * self.steps_per_epoch
        if cfg.max_steps:
            warmup = cfg.dcg_warmup_epochs * self.steps_per_epoch if self.module.denoiser is not None else 0
            total = min(total, warmup + cfg.max_steps)
        return ProgressBar("train", total, self.state.step - self.state.start_step, self.show_progress,
                           transient=False)


def train(config: Config, shard_dir: str | Path, run_dir: str | Path | None = None, resume: bool = True,
          progress: bool = True, facts: dict | None = None, allow_changes: Iterable[str] = ()) -> TrainResult:
    """Trains, resumes or fine-tunes a run; the same call for one process or many.

    `facts` (e.g. {"config_file": ..., "processes": N}) are recorded in run.json and shown in the run's
    banner; `allow_changes` names settings (train.lr, ...) a resume may change from the run's own.
    """
    trainer = Trainer(config, shard_dir, run_dir, progress, resume, allow_changes, facts)
    try:
        if trainer.finished():
            return trainer.already_finished()
        trainer.resume()  # every file of the checkpoint is read before anything in the run folder is written
        trainer.prepare_run()
        return trainer.fit()
    except KeyboardInterrupt:
        trainer.print(f"interrupted (Ctrl-C) at step {trainer.state.step}: nothing was saved after that; run the same "
                      f"command to resume from {trainer.checkpoints.last or 'the start'}")
        raise
    finally:
        trainer.close()
