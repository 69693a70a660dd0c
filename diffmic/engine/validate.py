"""Validation during training: the model-selection split sampled on every process, gathered once, scored
on every process (so all agree on whether a checkpoint is the best so far)."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..data import eval_loader
from ..evaluation.inference import check_keys, gather_predictions, predict_batches
from ..evaluation.metrics import METRICS, selection_score, split_metrics
from .distributed import forward_autocast


@dataclass
class Validation:
    row: dict  # the metrics.jsonl row
    score: float  # train.select_metric of the diffusion's predictions

    def summary(self) -> str:
        split = self.row["split"]
        return (f"step {self.row['step']} {split}: accuracy {self.row[f'{split}/accuracy']:.4f}, macro F1 "
                f"{self.row[f'{split}/macro_f1']:.4f} (DCG accuracy {self.row[f'{split}/dcg_accuracy']:.4f})")


class Validator:
    def __init__(self, accelerator, shard_dir: Path, manifest, config: Config):
        self.accelerator, self.shard_dir, self.manifest, self.config = accelerator, shard_dir, manifest, config
        self.split = config.train.select_split
        self.metric = config.train.select_metric
        self.settings = config.eval

    def __call__(self, module, ema, step: int, epoch: int) -> Validation:
        acc, settings = self.accelerator, self.settings
        loader = eval_loader(self.shard_dir, self.split, self.config.data, settings.batch_size,
                             acc.process_index, acc.num_processes)
        weights = ema.swapped_into(module.denoiser) if (ema is not None and settings.use_ema) else nullcontext()
        started = time.perf_counter()
        with weights:
            local = predict_batches(module, loader, acc.device, self.config.train.seed, settings,
                                    autocast=forward_autocast(acc))
        predictions = gather_predictions(local, acc)
        # With data.fold, 'val' is that fold of the train split (Manifest.selection).
        check_keys(predictions, self.manifest.selection(self.split, self.config.data.fold).keys, self.split)
        metrics = split_metrics(predictions.labels, predictions.probs, predictions.dcg_probs, self.manifest.classes)
        score = selection_score(metrics, self.metric)
        split = self.split
        # The registered metrics marked `logged` (diffmic.evaluation.metrics.METRICS), then the time it took.
        logged = {f"{split}/{metric.logged}": metrics[metric.key] for metric in METRICS if metric.logged}
        seconds = time.perf_counter() - started
        row = {"step": step, "epoch": epoch, "split": split, **logged, f"{split}/seconds": seconds,
               "selection_score": score}
        return Validation(row, score)
