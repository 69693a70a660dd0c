"""The `diffmic` command: parses options and calls the library. Each sub-command lives in its own module."""

from __future__ import annotations

import typer

from .. import __version__
from .common import app, run_command

# Imported in the order `diffmic --help` lists the commands: the user's path first.
# isort: off
from . import data as _data  # noqa: F401  (shard, verify, info)
from . import train as _train  # noqa: F401
from . import evaluate as _evaluate  # noqa: F401  (eval, predict)
from . import reference as _reference  # noqa: F401  (import-reference: a model trained with the authors' code)
from . import status as _status  # noqa: F401
from . import report as _report  # noqa: F401  (curves.png)
from . import sweep as _sweep  # noqa: F401  (sweep, compare)
from . import model as _model  # noqa: F401  (model-summary)
from . import configs as _configs  # noqa: F401  (configs list, show, copy, path)
from . import weights as _weights  # noqa: F401  (weights list, fetch)
# isort: on


def _version(value: bool) -> None:
    if value:
        import torch

        cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA build"
        devices = f"{torch.cuda.device_count()} GPU(s) visible" if torch.cuda.is_available() else "no GPU visible"
        typer.echo(f"diffmic {__version__} (torch {torch.__version__}, {cuda}, {devices})")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version (and torch's, CUDA's) and exit.")) -> None:
    """DiffMIC: dual-guidance diffusion for medical image classification.

    The usual path: shard a dataset, train on the shards, evaluate the run:
      diffmic shard --dataset ham10000          (reads data/ham10000, writes shards/ham10000)
      diffmic train --dataset ham10000          (configs/ham10000.yaml; writes runs/ham10000-<time>)
      diffmic eval --run runs/ham10000-<time>

    A model trained with the authors' code becomes a run folder:
      diffmic import-reference --ckpt ckpt_best.pth --aux-ckpt aux_ckpt_best.pth \
          --config configs/reference/ham10000.yaml --out runs/authors-ham10000

    Configs and launch files ship with diffmic: `diffmic configs list` shows them.

    `diffmic COMMAND -h` shows each command's options and examples.
    """


def main() -> None:
    run_command(app)


__all__ = ["app", "main"]
