"""The `diffmic` command: parses options and calls the library. Each sub-command lives in its own module."""

from __future__ import annotations

import typer

from .. import __version__
from .common import app, run_command
from . import model as _model  # noqa: F401  (registers model-summary)
from . import data as _data  # noqa: F401
from . import train as _train  # noqa: F401
from . import evaluate as _evaluate  # noqa: F401
from . import launch as _launch  # noqa: F401


def _version(value: bool) -> None:
    if value:
        typer.echo(f"diffmic {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """DiffMIC: dual-guidance diffusion for medical image classification.

    The usual path: `diffmic shard` a dataset, `diffmic train` on the shards, `diffmic eval` the run.
    """


def main() -> None:
    run_command(app)


__all__ = ["app", "main"]
