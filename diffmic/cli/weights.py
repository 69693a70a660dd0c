"""`diffmic weights list|fetch`: the starting weights a config asks for, and filling the cache offline nodes read."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import SET_OPTION, app, config_file, console

weights_app = typer.Typer(no_args_is_help=True, help="""Show or pre-fetch the starting weights a config asks for.

`imagenet` in a config means torchvision's IMAGENET1K_V1 weights, kept in the torch hub cache ($TORCH_HOME,
default ~/.cache/torch). Compute nodes are often offline: fetch on a login node that shares that folder, or copy
it. With DIFFMIC_OFFLINE=1 diffmic never downloads.

Examples:
  diffmic weights list --dataset ham10000
  diffmic weights fetch --config configs/ham10000.yaml
  TORCH_HOME=/shared/torch diffmic weights fetch --dataset aptos2019
""")
app.add_typer(weights_app, name="weights")

CONFIG_OPTION = typer.Option(None, "--config", "-c", help="Experiment YAML: a path, or a name in ./configs/ or "
                                                          "among the packaged configs.")
DATASET_OPTION = typer.Option(None, "--dataset", "-d", help="Short form: configs/NAME.yaml (here, else packaged).")


def _requests(config: Path | None, dataset: str | None, overrides: list[str] | None):
    from ..config import load_config
    from ..models.pretrained import requested_weights

    return requested_weights(load_config(config_file(config, dataset), overrides or []))


@weights_app.command("list")
def list_command(config: Path = CONFIG_OPTION, dataset: str = DATASET_OPTION,
                 overrides: list[str] = SET_OPTION) -> None:
    """One line per trunk that starts from a file: the config key, the file, and whether it is here.

    Example: diffmic weights list --dataset ham10000
    """
    requests = _requests(config, dataset, overrides)
    if not requests:
        console.print("every trunk of this config starts from random weights: nothing to fetch")
        return
    table = Table("trunk", "asked by", "file", "here", title="starting weights")
    for column in table.columns[1:3]:  # keys and paths stay complete in a narrow terminal
        column.overflow = "fold"
    for request in requests:
        here = "[green]yes[/]" if request.path.is_file() else "[red]no[/]"
        table.add_row(request.trunk, f"{request.key}={request.source} ({request.arch})", str(request.path), here)
    console.print(table)
    missing = {request.path: request.url for request in requests if request.is_imagenet and not request.path.is_file()}
    for path, url in missing.items():
        console.print(f"missing {path.name}: `diffmic weights fetch` here, or download {url} into {path.parent}",
                      highlight=False, soft_wrap=True)


@weights_app.command("fetch")
def fetch_command(config: Path = CONFIG_OPTION, dataset: str = DATASET_OPTION,
                  overrides: list[str] = SET_OPTION) -> None:
    """Download what the config's trunks start from into the torch hub cache (files already there are kept).

    Example: diffmic weights fetch --config configs/ham10000.yaml
    """
    from ..models.pretrained import fetch

    requests = _requests(config, dataset, overrides)
    for path in dict.fromkeys(fetch(request) for request in requests):
        console.print(f"ready: {path}", highlight=False, soft_wrap=True)
    if not requests:
        console.print("every trunk of this config starts from random weights: nothing to fetch")
