"""A model trained with the authors' code (github.com/scott-yjyang/DiffMIC) becomes a diffmic run folder.

The folder holds config.yaml, run.json (where the weights came from: both files and their sha256, the authors'
epoch and step, which denoiser weights) and one weights-only checkpoint, step-N with N the authors' step (also
recorded as the run's best: their ckpt_best.pth is their choice): `diffmic eval`/`predict` read it and
`diffmic train --run-dir` fine-tunes from it. The folder is assembled under a hidden name beside its final one
and renamed into place, so a refusal or a crash leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import UserError
from ..fileio import file_sha256
from .folder import RunFolder, provenance

DIFFUSION_VARIANTS = ("full", "c2")  # the authors' model: a DCG and a denoiser fed [y_t, prior]


@dataclass
class ImportedRun:
    folder: RunFolder
    checkpoint: object  # the checkpoint written (diffmic.checkpoint.Checkpoint)
    tensors: int  # weights imported
    with_ema: bool  # whether the authors' file held an EMA of the denoiser
    use_ema: bool  # the config's eval.use_ema: which denoiser weights eval and predict use unless told

    def describe(self) -> str:
        if not self.with_ema:
            ema = "raw denoiser weights (the file holds no EMA)"
        elif self.use_ema:
            ema = "with the authors' EMA of the denoiser, used by default (eval.use_ema); --no-ema for the raw weights"
        else:
            ema = ("with the authors' EMA of the denoiser; eval.use_ema is false, so eval uses the raw weights "
                   "unless given --ema")
        return (f"imported {self.tensors} tensors into {self.checkpoint.path} ({ema}).\n"
                f"evaluate it: diffmic eval --run {self.folder.path}")


def import_reference(ckpt: Path, aux_ckpt: Path, config: Config, out: Path, config_file: Path | None = None,
                     shards: str | Path | None = None, classes: list[str] | None = None) -> ImportedRun:
    """The authors' two files (`ckpt`: the denoiser and its EMA, `aux_ckpt`: the DCG), mapped onto the model of
    `config`, as the new run folder `out`. The class names come from `classes`, else the shard folder (whose
    manifest hash is recorded, so that eval finds it), else the dataset's known names."""
    from ..checkpoint.reference import read_reference_weights

    if config.model.variant not in DIFFUSION_VARIANTS:
        raise UserError(f"model.variant is {config.model.variant!r}, but the authors' checkpoints hold a DCG and a "
                        f"denoiser: use a config with model.variant full or c2")
    folder = RunFolder(out)
    if folder.path.exists() and (not folder.path.is_dir() or any(folder.path.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; import into a new folder")
    class_names, data = class_list(config, shards, classes)
    files, imported = read_reference_weights(config, ckpt, aux_ckpt)
    origin = {
        "code": "github.com/scott-yjyang/DiffMIC",
        "ckpt": str(Path(ckpt).resolve()), "ckpt_sha256": file_sha256(ckpt),
        "aux_ckpt": str(Path(aux_ckpt).resolve()), "aux_ckpt_sha256": file_sha256(aux_ckpt),
        "epoch": files.epoch, "step": files.step,
        "denoiser_ema": ("the authors' EMA shadow (item 4 of --ckpt) in ema.safetensors; raw weights in "
                         "model.safetensors" if imported.ema is not None else
                         "none in --ckpt (the authors save it in ckpt.pth, not in ckpt_best.pth): raw weights only"),
    }
    facts = {**({"config_file": str(Path(config_file).resolve())} if config_file else {}), "imported_from": origin}
    checkpoint = _assemble(folder, config, provenance(**data, classes=class_names), facts, files.step, imported)
    return ImportedRun(folder, checkpoint, len(imported.model), imported.ema is not None, config.eval.use_ema)


def class_list(config: Config, shards: str | Path | None, classes: list[str] | None) -> tuple[list[str], dict]:
    """(class names, data provenance). A shard folder gives both its names and its manifest hash, so that
    `diffmic eval` finds the shards without --shards; else `classes`, else the dataset's known names."""
    from ..data import absolute_location, as_location, is_url, read_manifest, shard_dir_for
    from ..data.loaders import check_compatible

    if classes is not None:
        if len(classes) != config.data.num_classes or len(set(classes)) != len(classes):
            raise UserError(f"--classes lists {len(classes)} distinct name(s) but data.num_classes is "
                            f"{config.data.num_classes}")
        return list(classes), {}
    folder = as_location(shards if shards is not None else shard_dir_for(config.data))
    # The config's own local folder counts only when it holds shards; a URL is read (and must be there).
    if shards is not None or is_url(folder) or (folder / "manifest.json").is_file():
        manifest = read_manifest(folder)
        check_compatible(manifest, config.data)
        return list(manifest.classes), {"shards": absolute_location(folder), "manifest_sha256": manifest.digest}
    return known_classes(config), {}


def known_classes(config: Config) -> list[str]:
    from ..data.layouts import LAYOUTS  # importing it runs diffmic.data's __init__, which registers every layout

    layout = LAYOUTS.get(config.data.dataset)
    if layout is None or layout.classes is None or len(layout.classes) != config.data.num_classes:
        raise UserError(f"no class names for data.dataset={config.data.dataset!r} with {config.data.num_classes} "
                        f"classes: pass --shards (a shard folder) or --classes NAME,NAME,...")
    return list(layout.classes)


def _assemble(folder: RunFolder, config: Config, provenance: dict, facts: dict, step: int, imported):
    """config.yaml, run.json and checkpoints/step-N (also the best), assembled under a hidden name, then renamed
    to `folder`; returns the checkpoint at its final place."""
    from ..checkpoint import read_checkpoint, verify, write_best_checkpoint, write_weights_checkpoint

    staging = RunFolder(folder.staging)
    classes, origin = provenance["classes"], facts["imported_from"]
    shutil.rmtree(staging, ignore_errors=True)
    try:
        checkpoint = write_weights_checkpoint(staging, imported.model, config, classes, ema_state=imported.ema,
                                              step=step, provenance=provenance, imported_from=origin)
        # Their ckpt_best.pth is their best (chosen on the test split, their protocol): eval's default reads it.
        write_best_checkpoint(staging, imported.model, config, classes, step=step, ema_state=imported.ema,
                              same_as=checkpoint.path, provenance=provenance, imported_from=origin,
                              selection={"metric": "the authors' choice (--ckpt)", "score": None, "split": "test"})
        staging.write_record(config, provenance, facts, {"mode": "import", "imported_from": origin})
        if folder.path.is_dir():
            folder.path.rmdir()  # checked empty by the caller; os.replace needs the name free
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Read back as eval will read it: every file against the sha256 computed while it was written.
    written = read_checkpoint(folder.path / checkpoint.path.relative_to(staging.path))
    return verify(written, read=written.files)
