"""`diffmic eval` and `diffmic predict` as functions: load a checkpoint, sample, report.

The evaluator runs standalone or under `accelerate launch`: each process samples a disjoint part of
the split, the results are gathered once, and rank 0 checks them against the manifest and writes
metrics.json (sealed with its checksum), predictions.csv and the PNG figures into a hidden folder beside the output
folder, which then replaces it whole: an evaluation folder never mixes the files of two evaluations. Where the
results go is checked before any image is read.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint as ckpt
from ..accelerator import inference_precision, make_accelerator
from ..config import EvalConfig
from ..data import as_location, eval_loader, read_manifest
from ..data.images import IMAGE_SUFFIXES
from ..diffusion.uncertainty import MEASURES, available_measures, top_label_uncertainty
from ..errors import CheckpointError, EvalSettingsError, RunFileError, UnreadableImageError
from ..fileio import check_writable, sealed, write_text_atomic
from ..progress import ProgressBar
from ..run import RunFolder
from .calibration import fitted_temperature, selective_curve, trust_metrics
from .inference import SplitPredictions, check_keys, gather_predictions, predict_batches
from .metrics import metrics_table, split_metrics
from .plots import plot_confusion_matrix, plot_reliability, plot_selective, plot_trajectory

TRAJECTORY_POINTS = 10  # recorded states along each chain for the trajectory figure


@dataclass
class EvalResult:
    out_dir: Path | None  # None on ranks other than 0
    metrics: dict
    predictions: SplitPredictions


def precision_autocast(device: torch.device, precision: str):
    """The autocast context factory of an inference precision ("bf16" or "no")."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def load_checkpoint_model(run_dir: Path, checkpoint: str, settings: EvalConfig | None, device: torch.device):
    """The checkpoint, its model on `device` ready to sample (compiled if the settings ask) and the settings
    to sample it with (the run's own where none are given)."""
    info = ckpt.find_checkpoint(run_dir, checkpoint)
    settings = settings or info.config.eval
    model = ckpt.build_model_from_checkpoint(info, settings.use_ema).to(device)
    # Value checks read tensors back to the host: free on a CPU, a sync per batch on a GPU.
    model.check_values = device.type == "cpu"
    if settings.compile:
        model.compile_sampling(device)
    return info, model, settings


def check_shards_fit(manifest, info: ckpt.Checkpoint) -> None:
    """Shards the checkpoint's model can read: its classes and image size. `eval` cannot change the model, so
    the advice names shards, never a setting (the trainer's check would say `set data.num_classes=N`)."""
    if list(manifest.classes) != info.classes:
        raise CheckpointError(f"{manifest.folder} has classes {manifest.classes} but the checkpoint {info.path} was "
                              f"trained on {info.classes}; evaluate it on the shards it was trained with")
    size = info.config.data.image_size
    if manifest.image_size != size:
        raise CheckpointError(f"{manifest.folder} holds {manifest.image_size}px images but the checkpoint {info.path} "
                              f"was trained on {size}px ones; evaluate it on the shards it was trained with, or "
                              f"re-shard with --size {size}")


def shards_of(run_dir: Path, info: ckpt.Checkpoint, shards: str | Path | None) -> str | Path:
    if shards is not None:
        return as_location(shards)
    if info.shards:
        return as_location(info.shards)
    raise CheckpointError(f"the checkpoint of {run_dir} does not say which shards it used; pass --shards")


def check_same_manifest(manifest, info: ckpt.Checkpoint) -> None:
    """The shards a run trained on, found by its record, must still be those shards: a manifest that changed since
    (re-sharded, edited, damaged) would evaluate other images under the run's name. --shards evaluates any."""
    if info.manifest_sha256 and manifest.digest != info.manifest_sha256:
        raise CheckpointError(f"{manifest.path} changed since the run trained on it (sha256 {manifest.digest[:12]}..., "
                              f"the checkpoint {info.path} recorded {info.manifest_sha256[:12]}...); restore the "
                              f"shards, or pass --shards {manifest.folder} to evaluate on them as they are now")


def output_folder(run_dir: Path, out_dir, split: str, checkpoint: str, settings: EvalConfig) -> Path:
    """--out, else RUN/eval/<split>-<checkpoint>-<sampler><steps> (a checkpoint given as a folder by its name).
    Checked now, before any image is read: a file or a folder of other files there is refused (it would be
    replaced), and so is a place that cannot be written."""
    out = Path(out_dir) if out_dir else RunFolder(run_dir).default_evaluation(split, Path(checkpoint).name,
                                                                              settings.sampler, settings.steps)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise RunFileError(f"--out {out} is a file or a link, not a folder; choose a new folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "metrics.json").is_file():
        raise RunFileError(f"--out {out} holds files that are not an evaluation (no metrics.json), which writing "
                           f"the evaluation there would replace; choose a new or empty folder")
    check_writable(out.parent, "pass --out with a folder that can be written" if not out_dir else
                   "choose another --out")
    return out


def evaluate_run(run_dir: str | Path, checkpoint: str = "best", split: str = "test",
                 settings: EvalConfig | None = None, out_dir: str | Path | None = None,
                 shards: str | Path | None = None, progress: bool = True) -> EvalResult:
    """`settings` from `resolve_eval_settings` on the checkpoint's config; None: that config's own."""
    run_dir = Path(run_dir)
    # Inference needs no DeepSpeed engine even for a DeepSpeed-trained run: plain processes suffice.
    accelerator = make_accelerator("no")
    try:
        return _evaluate(run_dir, checkpoint, split, settings, out_dir, shards, progress, accelerator)
    finally:
        accelerator.end_training()


def _evaluate(run_dir: Path, checkpoint: str, split: str, settings: EvalConfig | None, out_dir, shards,
              progress: bool, accelerator) -> EvalResult:
    info, model, settings = load_checkpoint_model(run_dir, checkpoint, settings, accelerator.device)
    config = info.config
    out = output_folder(run_dir, out_dir, split, checkpoint, settings)
    shard_dir = shards_of(run_dir, info, shards)
    manifest = read_manifest(shard_dir)
    if shards is None:
        check_same_manifest(manifest, info)
    check_shards_fit(manifest, info)
    expected_keys = manifest.split_info(split).keys
    # Autocast here rather than Accelerate's: its precision is fixed once per process, and one process may
    # evaluate in fp32 and in bf16 (benchmarks/precision_agreement.py).
    precision = inference_precision(settings.precision)
    loader = eval_loader(shard_dir, split, config.data, settings.batch_size, accelerator.process_index,
                         accelerator.num_processes)
    record_every = max(1, settings.steps // TRAJECTORY_POINTS) if model.denoiser is not None else 0
    started = time.perf_counter()
    # Only this process's share is counted: the bar tracks rank 0's part of the split.
    with ProgressBar("eval", enabled=accelerator.is_main_process and progress) as bar:
        local = predict_batches(model, loader, accelerator.device, config.train.seed, settings, record_every,
                                precision_autocast(accelerator.device, precision), on_batch=bar.advance)
    predictions = gather_predictions(local, accelerator)
    seconds = time.perf_counter() - started
    check_keys(predictions, expected_keys, split)
    predictions = predictions.reordered(expected_keys)
    metrics = _report(predictions, manifest.classes, info, manifest, split, settings, seconds)
    metrics["precision"] = "bf16" if precision == "bf16" else "fp32"
    if accelerator.is_main_process:
        write_outputs(out, predictions, metrics, manifest.classes)
    accelerator.wait_for_everyone()
    return EvalResult(out if accelerator.is_main_process else None, metrics, predictions)


def _report(predictions, classes, info, manifest, split, settings: EvalConfig, seconds) -> dict:
    metrics = split_metrics(predictions.labels, predictions.probs, predictions.dcg_probs, classes)
    metrics.update({
        "split": split,
        "sampler": settings.sampler, "steps": settings.steps,
        "n_samples": settings.n_samples, "ema": settings.use_ema and info.has_ema, "seconds": seconds,
        "compiled": settings.compile,
        "images_per_s": len(predictions.keys) / max(seconds, 1e-9), "checkpoint": str(info.path),
        "checkpoint_step": info.step, "manifest": str(manifest.path), "manifest_sha256": manifest.digest,
    })
    measures = {name: predictions.uncertainty(name) for name in available_measures(predictions.chain_outputs)}
    metrics.update(trust_metrics(predictions.labels, predictions.probs, predictions.dcg_probs, measures,
                                 settings.uncertainty))
    if predictions.y0 is not None:
        metrics["fitted_temperature"] = fitted_temperature(predictions.y0.mean(axis=1), predictions.labels)
    return metrics


def write_outputs(out: Path, predictions: SplitPredictions, metrics: dict, classes: list[str]) -> None:
    """Every file into a hidden folder beside `out`, which then takes its place (an earlier evaluation there goes)."""
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write_text_atomic(staging / "predictions.csv", predictions_csv(predictions, classes, metrics["uncertainty_measure"]))
        plot_confusion_matrix(metrics["confusion_matrix"], classes, staging / "confusion_matrix.png")
        if predictions.trajectory:
            plot_trajectory(predictions.trajectory, predictions.labels, classes, staging / "trajectory.png")
        write_trust_figures(staging, predictions, metrics["uncertainty_measure"])
        write_text_atomic(staging / "metrics.json", json.dumps(sealed(metrics), indent=2, allow_nan=False))
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_folder(new: Path, target: Path) -> None:
    """`new` renamed to `target`; an existing `target` is moved aside first and removed after."""
    if not target.exists():
        os.replace(new, target)
        return
    aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside, ignore_errors=True)


def write_trust_figures(out: Path, predictions: SplitPredictions, measure: str) -> None:
    """reliability.png (diffusion and DCG side by side) always; selective.png where the run's uncertainty
    measure can be had, beside the DCG's 1 - max probability and, with several chains, their disagreement.
    The basic variant has no diffusion: its one model is drawn once."""
    labels, diffusion, dcg = predictions.labels, predictions.probs, predictions.dcg_probs
    same = np.array_equal(diffusion, dcg)
    plot_reliability(labels, {"classifier": dcg} if same else {"diffusion": diffusion, "DCG": dcg},
                     out / "reliability.png")
    chosen = predictions.uncertainty(measure)
    if chosen is None or same:
        return
    curves = {f"diffusion ({measure}, eval.uncertainty)": selective_curve(labels, diffusion, chosen)}
    for other in ("disagreement", "dcg_max_prob"):
        values = predictions.uncertainty(other)
        if other != measure and values is not None:
            curves[f"diffusion ({other})"] = selective_curve(labels, diffusion, values)
    curves["DCG alone (1 - its max probability)"] = selective_curve(labels, dcg, top_label_uncertainty(dcg))
    plot_selective(curves, out / "selective.png")


def predictions_csv(predictions: SplitPredictions, classes: list[str], measure: str) -> str:
    """One row per image; `uncertainty` is the run's measure (eval.uncertainty), where these predictions give it."""
    uncertainty = predictions.uncertainty(measure)
    header = ["key", "label", "predicted", *[f"prob_{c}" for c in classes], "dcg_predicted"]
    if uncertainty is not None:
        header.append("uncertainty")
    if predictions.spread is not None:
        header += [f"spread_{c}" for c in classes]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for i, key in enumerate(predictions.keys):
        row = [key, classes[predictions.labels[i]], classes[predictions.predicted[i]],
               *[f"{p:.6f}" for p in predictions.probs[i]], classes[predictions.dcg_predicted[i]]]
        if uncertainty is not None:
            row.append(f"{uncertainty[i]:.6f}")
        if predictions.spread is not None:
            row += [f"{s:.6f}" for s in predictions.spread[i]]
        writer.writerow(row)
    return buffer.getvalue()


def print_metrics(metrics: dict, title: str) -> None:
    """The registered metrics (diffmic.evaluation.metrics.METRICS), then how the chains were sampled."""
    from rich.console import Console

    extra = [("sampler", f"{metrics['sampler']} x {metrics['steps']} steps, {metrics['n_samples']} chain(s)"),
             ("uncertainty measure", metrics["uncertainty_measure"]), ("images/s", f"{metrics['images_per_s']:.1f}")]
    Console().print(metrics_table(metrics, title, extra))


def print_result(result: EvalResult, split: str, checkpoint: str) -> None:
    """What `diffmic eval` ends with, on the main process: the metrics table and the files written."""
    from rich.console import Console

    metrics = result.metrics
    print_metrics(metrics, f"{split} split, {checkpoint} checkpoint (step {metrics['checkpoint_step']})")
    Console().print(f"wrote {result.out_dir}/metrics.json, predictions.csv, confusion_matrix.png"
                    + (", trajectory.png" if (result.out_dir / "trajectory.png").is_file() else ""), highlight=False)


# --- predict on loose files ---------------------------------------------------------------------------
def image_files(paths: list[Path]) -> list[Path]:
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist; pass image files or folders of images")
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {', '.join(map(str, paths))}")
    return found


def load_images(files: list[Path], transform) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    tensors = []
    for path in files:
        try:
            with Image.open(path) as image:
                image.load()
                tensors.append(transform(image))
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise UnreadableImageError(f"{path} is not a readable image ({error}); remove it or convert it") from None
        except Image.DecompressionBombError as error:  # refused from its header, before any pixel is decoded
            raise UnreadableImageError(f"{path} is refused without being decoded ({error}); shrink it first: "
                                       f"the model reads it resized to its input size anyway") from None
    return torch.stack(tensors)


def predict_files(run_dir: str | Path, paths: list[Path], checkpoint: str = "best",
                  settings: EvalConfig | None = None, batch_size: int = 32) -> tuple[list[dict], list[str]]:
    """Rows of (file, predicted class, probabilities, uncertainty) for loose image files."""
    from ..data import eval_transform

    # One process: the first GPU where there is one (a clinician's single image), else the CPU.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info, model, settings = load_checkpoint_model(Path(run_dir), checkpoint, settings, device)
    config = info.config
    autocast = precision_autocast(device, inference_precision(settings.precision))
    files = image_files(paths)
    transform = eval_transform(config.data)
    classes = info.classes
    rows = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        batch = {"image": load_images(chunk, transform), "label": torch.zeros(len(chunk), dtype=torch.long),
                 "key": [str(path) for path in chunk]}
        result = predict_batches(model, [batch], device, config.train.seed, settings, autocast=autocast)
        uncertainty = result.uncertainty(settings.uncertainty)
        for i, path in enumerate(chunk):
            row = {"file": str(path), "predicted": classes[result.predicted[i]],
                   **{f"prob_{c}": float(p) for c, p in zip(classes, result.probs[i])},
                   "dcg_predicted": classes[result.dcg_predicted[i]]}
            # Rounded as the CSV writes it: a share of chains, k / n_samples, in float32 is 1 - 0.7 = 0.30000001,
            # and --flag-uncertain 0.3 must not flag 3 disagreeing chains out of 10.
            row["uncertainty"] = round(float(uncertainty[i]), 6) if uncertainty is not None else None
            rows.append(row)
    return rows, classes


def check_flag_threshold(threshold: float, config, settings: EvalConfig) -> None:
    """`diffmic predict --flag-uncertain T` compares T with the run's uncertainty measure (eval.uncertainty):
    a T below 0, above 1 for a measure that lies in [0, 1], or NaN means nothing and is refused, as is a chain
    measure without several diffusion chains per image."""
    measure = MEASURES[settings.uncertainty]
    top = 1.0 if measure.within_one else float("inf")
    if not 0.0 <= threshold <= top:  # also refuses NaN
        allowed = "0..1" if measure.within_one else "0 or more"
        raise EvalSettingsError(f"--flag-uncertain must be {allowed} for the uncertainty {settings.uncertainty!r} "
                                f"({measure.description}), not {threshold:g}")
    if measure.needs_chains and not config.uses_diffusion:
        raise EvalSettingsError(f"--flag-uncertain with the uncertainty {settings.uncertainty!r} needs the "
                                "diffusion's chains, and this run is the 'basic' variant (the DCG alone): use "
                                "--uncertainty dcg_entropy")


def flag_uncertain_rows(rows: list[dict], threshold: float) -> None:
    """Add `check`: "yes" to the rows whose uncertainty is above `threshold` (strictly), else "no"."""
    for row in rows:
        row["check"] = "yes" if row["uncertainty"] is not None and row["uncertainty"] > threshold else "no"


def write_rows_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    write_text_atomic(path, buffer.getvalue())
