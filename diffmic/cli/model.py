"""`diffmic model-summary`: the networks a config builds and their parameter counts."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import SET_OPTION, app, config_file, console


@app.command("model-summary")
def model_summary(
    config: Path = typer.Option(None, "--config", "-c", help="Experiment YAML: a path, or a name in ./configs/ "
                                                            "or among the packaged configs. Default: "
                                                            "configs/<dataset>.yaml."),
    dataset: str = typer.Option(None, "--dataset", "-d", help="Short form: configs/NAME.yaml (here, else packaged)."),
    overrides: list[str] = SET_OPTION,
) -> None:
    """Print the parameter count of every part of the model a config builds.

    Examples:
      diffmic model-summary --config configs/ham10000.yaml
      diffmic model-summary --dataset aptos2019 --set model.variant=basic
    """
    from ..checkpoint import without_pretrained
    from ..config import load_config
    from ..models import build_model

    config = config_file(config, dataset)
    cfg = load_config(config, overrides or [])
    model = build_model(without_pretrained(cfg))  # counting parameters reads no ImageNet file
    table = Table(title=f"{config} (variant {cfg.model.variant}, {cfg.data.num_classes} classes, "
                        f"{cfg.data.image_size}px)")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    for name, part in parameter_breakdown(model):
        table.add_row(name, f"{part:,}")
    console.print(table)


def parameter_breakdown(model) -> list[tuple[str, int]]:
    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    rows = [(f"guidance ({type(model.dcg).__name__})", count(model.dcg))]
    for name, child in model.dcg.named_children():
        rows.append((f"  {name}", count(child)))
    if model.denoiser is not None:
        rows.append(("denoiser", count(model.denoiser)))
        rows.append(("  image encoder rho(x)", count(model.denoiser.encoder)))
        rows.append(("  conditional MLP", count(model.denoiser) - count(model.denoiser.encoder)))
    rows.append(("total", count(model)))
    return rows
