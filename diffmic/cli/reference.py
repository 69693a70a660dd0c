"""`diffmic import-reference`: a model trained with the authors' code becomes a diffmic run folder.

The folder holds config.yaml, run.json (where the weights came from: both files and their sha256, the
authors' epoch and step, which denoiser weights) and one weights-only checkpoint, step-N with N the
authors' step: `diffmic eval`/`predict` read it and `diffmic train --run-dir` fine-tunes from it. The
folder is assembled under a hidden name beside --out and renamed into place, so a refusal or a crash
leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import typer

from .common import SET_OPTION, UserError, app, config_file, console

DIFFUSION_VARIANTS = ("full", "c2")  # the authors' model: a DCG and a denoiser fed [y_t, prior]


@app.command("import-reference")
def import_reference_command(
    ckpt: Path = typer.Option(..., "--ckpt", help="The authors' denoiser checkpoint (ckpt_best.pth or ckpt.pth)."),
    aux_ckpt: Path = typer.Option(..., "--aux-ckpt", help="The authors' DCG checkpoint (aux_ckpt_best.pth or "
                                                         "aux_ckpt.pth)."),
    config: Path = typer.Option(None, "--config", "-c", help="The config describing their model, e.g. "
                                                            "configs/reference/ham10000.yaml."),
    dataset: str = typer.Option(None, "--dataset", "-d", help="Short form: configs/NAME.yaml."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to create; it must not exist yet."),
    shards: str = typer.Option(None, "--shards", help="Shard folder (or its URL) the run evaluates on by default "
                                                      "(its class names are recorded). Default: data.shards of the "
                                                      "config, else shards/<data.dataset>, when it exists."),
    classes: str = typer.Option(None, "--classes", help="Class names in the authors' label order, comma-separated, "
                                                        "when no shard folder is at hand. Default: the dataset's."),
    overrides: list[str] = SET_OPTION,
) -> None:
    """Import a model trained with the authors' code (scott-yjyang/DiffMIC) as a diffmic run folder.

    Every weight is mapped by name with its shape checked; anything missing, extra or of another shape is
    refused, and nothing is written. The denoiser's EMA is imported when their file has one (`diffmic eval`
    uses it by default; --no-ema gives the raw weights).

    Examples:
      diffmic import-reference --ckpt logs/isic/ckpt_best.pth --aux-ckpt logs/isic/aux_ckpt_best.pth \\
          --config configs/reference/ham10000.yaml --out runs/authors-ham10000
      diffmic eval --run runs/authors-ham10000 --sampler truncated --steps 250
      diffmic train --config configs/reference/ham10000.yaml --run-dir runs/authors-ham10000   (fine-tunes)
    """
    from ..config import load_config

    config_path = config_file(config, dataset)
    cfg = load_config(config_path, overrides or [])
    if cfg.model.variant not in DIFFUSION_VARIANTS:
        raise UserError(f"model.variant is {cfg.model.variant!r}, but the authors' checkpoints hold a DCG and a "
                        f"denoiser: use a config with model.variant full or c2")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; import into a new folder")
    class_names, origin = class_list(cfg, shards, classes)
    files, imported = import_weights(cfg, ckpt, aux_ckpt)
    checkpoint = write_imported_run(out, cfg, config_path, class_names, origin, ckpt, aux_ckpt, files, imported)
    console.print(describe(checkpoint, imported, out), highlight=False)


# --- inputs -------------------------------------------------------------------------------------------
def class_list(cfg, shards: str | None, classes: str | None) -> tuple[list[str], dict]:
    """(class names, data provenance). A shard folder gives both its names and its manifest hash, so that
    `diffmic eval` finds the shards without --shards; else --classes, else the dataset's known names."""
    from ..data import absolute_location, as_location, is_url, read_manifest, shard_dir_for
    from ..data.loaders import check_compatible

    if classes is not None:
        names = [name.strip() for name in classes.split(",") if name.strip()]
        if len(names) != cfg.data.num_classes or len(set(names)) != len(names):
            raise UserError(f"--classes lists {len(names)} distinct name(s) but data.num_classes is "
                            f"{cfg.data.num_classes}")
        return names, {}
    folder = as_location(shards if shards is not None else shard_dir_for(cfg.data))
    # The config's own local folder counts only when it holds shards; a URL is read (and must be there).
    if shards is not None or is_url(folder) or (folder / "manifest.json").is_file():
        manifest = read_manifest(folder)
        check_compatible(manifest, cfg.data)
        return list(manifest.classes), {"shards": absolute_location(folder), "manifest_sha256": manifest.digest}
    return known_classes(cfg), {}


def known_classes(cfg) -> list[str]:
    import diffmic.data  # noqa: F401  (importing diffmic.data registers every dataset layout)
    from ..data.layouts import LAYOUTS

    layout = LAYOUTS.get(cfg.data.dataset)
    if layout is None or layout.classes is None or len(layout.classes) != cfg.data.num_classes:
        raise UserError(f"no class names for data.dataset={cfg.data.dataset!r} with {cfg.data.num_classes} "
                        f"classes: pass --shards (a shard folder) or --classes NAME,NAME,...")
    return list(layout.classes)


def import_weights(cfg, ckpt: Path, aux_ckpt: Path):
    """(what the files hold, the diffmic weights): both files read and mapped onto the model `cfg` builds
    (names and shapes from the model itself)."""
    from ..checkpoint.record import skipped_initialisation, without_pretrained
    from ..checkpoint.reference import convert_reference, load_reference_files
    from ..models import build_model

    files = load_reference_files(ckpt, aux_ckpt)
    with skipped_initialisation():  # only the names and shapes are needed
        model = build_model(without_pretrained(cfg))
    expected = {name: value.shape for name, value in model.state_dict().items()}
    del model
    return files, convert_reference(files, expected)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- output -------------------------------------------------------------------------------------------
def write_imported_run(out: Path, cfg, config_path: Path, classes: list[str], data_origin: dict, ckpt: Path,
                       aux_ckpt: Path, files, imported):
    """config.yaml, run.json and checkpoints/step-N, assembled under a hidden name, then renamed to `out`."""
    from .. import __version__
    from ..checkpoint import write_best_checkpoint, write_weights_checkpoint
    from ..engine.rundir import git_commit, write_run_files

    origin = {
        "code": "github.com/scott-yjyang/DiffMIC",
        "ckpt": str(ckpt.resolve()), "ckpt_sha256": sha256(ckpt),
        "aux_ckpt": str(aux_ckpt.resolve()), "aux_ckpt_sha256": sha256(aux_ckpt),
        "epoch": files.epoch, "step": files.step,
        "denoiser_ema": ("the authors' EMA shadow (item 4 of --ckpt) in ema.safetensors; raw weights in "
                         "model.safetensors" if imported.ema is not None else
                         "none in --ckpt (the authors save it in ckpt.pth, not in ckpt_best.pth): raw weights only"),
    }
    provenance = {"git_commit": git_commit(), "diffmic_version": __version__, **data_origin, "classes": classes}
    staging = out.with_name(f".{out.name}.importing")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        checkpoint = write_weights_checkpoint(staging, imported.model, cfg, classes, ema_state=imported.ema,
                                              step=files.step, provenance=provenance, imported_from=origin)
        # Their ckpt_best.pth is their best (chosen on the test split, their protocol): eval's default reads it.
        write_best_checkpoint(staging, imported.model, cfg, classes, step=files.step, ema_state=imported.ema,
                              same_as=checkpoint.path, provenance=provenance, imported_from=origin,
                              selection={"metric": "the authors' choice (--ckpt)", "score": None, "split": "test"})
        facts = {"config_file": str(config_path.resolve()), "imported_from": origin}
        write_run_files(staging, cfg, provenance, facts, {"mode": "import", "imported_from": origin})
        if out.is_dir():
            out.rmdir()  # checked empty above; os.replace needs the name free
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    from ..checkpoint import read_checkpoint

    return read_checkpoint(out / checkpoint.path.relative_to(staging))


def describe(checkpoint, imported, out: Path) -> str:
    ema = ("with the authors' EMA of the denoiser (used by default; --no-ema for the raw weights)"
           if imported.ema is not None else "raw denoiser weights (the file holds no EMA)")
    return (f"imported {len(imported.model)} tensors into {checkpoint.path} ({ema}).\n"
            f"evaluate it: diffmic eval --run {out}")
