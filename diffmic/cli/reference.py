"""`diffmic import-reference`: a model trained with the authors' code becomes a diffmic run folder
(diffmic.run.authors does the work)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import SET_OPTION, app, config_file, console


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
    uses it where the config's eval.use_ema is true; --ema/--no-ema choose).

    Examples:
      diffmic import-reference --ckpt logs/isic/ckpt_best.pth --aux-ckpt logs/isic/aux_ckpt_best.pth \\
          --config configs/reference/ham10000.yaml --out runs/authors-ham10000
      diffmic eval --run runs/authors-ham10000 --sampler truncated --steps 250
      diffmic train --config configs/reference/ham10000.yaml --run-dir runs/authors-ham10000   (fine-tunes)
    """
    from ..config import load_config
    from ..run.authors import import_reference

    config_path = config_file(config, dataset)
    names = [name.strip() for name in classes.split(",") if name.strip()] if classes is not None else None
    imported = import_reference(ckpt, aux_ckpt, load_config(config_path, overrides or []), out, config_path, shards,
                                names)
    console.print(imported.describe(), highlight=False)
