"""Shared pieces of the command line: the Typer app and how user mistakes are reported."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from ..config import ConfigError
from ..errors import (CheckpointError, DiskFullError, EvalSettingsError, LaunchError, NonFiniteLossError,
                      PretrainedWeightsError, RunLockError, SlurmError, UnreadableImageError)
from ..data.manifest import ManifestError
from ..data.storage import StorageError
from ..data.sources import ShardError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
console = Console()
SET_OPTION = typer.Option(None, "--set", "-s", help="Override a config key: --set model.dcg.k=4 (repeatable).")
error_console = Console(stderr=True)


class UserError(Exception):
    """A mistake the user can fix: printed as one message, exit status 2, no traceback."""


# Errors that mean "your input is wrong", not "diffmic is broken".
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ConfigError, FileNotFoundError, ShardError,
                                                 ManifestError, PretrainedWeightsError, CheckpointError,
                                                 EvalSettingsError, UnreadableImageError, SlurmError, LaunchError,
                                                 NonFiniteLossError, RunLockError, DiskFullError, StorageError)


def config_file(config: Path | str | None, dataset: str | None) -> Path:
    """The experiment YAML of `--config NAME`, else of `--dataset NAME` (configs/NAME.yaml): a path, then
    ./configs/, then the configs packaged with diffmic (diffmic.packaged owns the order)."""
    from ..packaged import NotFoundError, find_file

    if config is None and dataset is None:
        raise UserError("pass --config FILE or --dataset NAME (configs/NAME.yaml)")
    try:
        return find_file(str(config) if config is not None else f"configs/{dataset}.yaml", "configs", "config")
    except NotFoundError as error:
        given = "--config" if config is not None else f"--dataset {dataset}"
        raise UserError(f"{error} ({given}); pass --config FILE, or see `diffmic configs list`") from None


def run_command(application: typer.Typer) -> None:
    try:
        # Without standalone mode click returns (not raises) the code of `raise typer.Exit(code)`.
        code = application(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except USER_ERRORS as error:
        # soft_wrap: a path in the message must stay one copyable piece, not be folded at the terminal width.
        error_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        error_console.print("aborted")
        sys.exit(130)
    except Exception as error:
        if _is_usage_error(error):
            error.show()
            sys.exit(error.exit_code)
        raise


def _is_usage_error(error: Exception) -> bool:
    """Click's usage errors (unknown option, extra argument) carry their own message and exit code. Typer
    >= 0.22 raises them from its own copy of click, so both families are checked."""
    import click

    families = (click.ClickException, getattr(typer, "TyperException", click.ClickException))
    return isinstance(error, families) and hasattr(error, "show") and hasattr(error, "exit_code")
