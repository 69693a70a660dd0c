"""Shared pieces of the command line: the Typer app, options generated from a dataclass's fields, and how
user mistakes are reported."""

from __future__ import annotations

import functools
import inspect
import sys
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import USER_ERRORS, UserError, file_system_error

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
console = Console()
SET_OPTION = typer.Option(None, "--set", "-s", help="Override a config key: --set model.dcg.k=4 (repeatable).")
error_console = Console(stderr=True)
INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C (128 + SIGINT)

__all__ = ["SET_OPTION", "UserError", "app", "config_file", "console", "error_console", "run_command", "warn"]


def field_options(group: type, panel: str | None = None, unset: str | None = None) -> list[inspect.Parameter]:
    """One Typer option per field of the dataclass `group` that declares a flag (diffmic.config.flag): its type,
    flag and help, in the order of the fields. With `unset` (e.g. "Default: the run's eval.{name}."), every
    option defaults to None, so that one not given means the config's value, and its help ends with `unset`.
    A choice of names (Literal) is read as text: the dataclass's own check refuses a wrong one."""
    types = typing.get_type_hints(group)
    options = []
    for field in fields(group):
        if "flag" not in field.metadata:
            continue
        kind = str if typing.get_origin(types[field.name]) is Literal else types[field.name]
        help_text = field.metadata["help"] + (" " + unset.format(name=field.name) if unset else "")
        default = typer.Option(None if unset else field.default, field.metadata["flag"], help=help_text,
                               rich_help_panel=panel)
        options.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=default))
    return options


def with_options(name: str, options: list[inspect.Parameter], build: Callable[..., Any]):
    """A decorator adding `options` to a Typer command, after its own; the command receives their values as one
    keyword argument `name`, made by `build(**values)`. Typer reads the signature and the type hints, so both
    are rewritten: the command's own (less `name`), then the options."""
    names = [option.name for option in options]

    def decorate(command):
        own = [parameter for key, parameter in inspect.signature(command).parameters.items() if key != name]

        @functools.wraps(command)
        def run(**values):
            chosen = {key: values.pop(key) for key in names}
            return command(**values, **{name: build(**chosen)})

        run.__signature__ = inspect.Signature(own + options)
        run.__annotations__ = {**{key: hint for key, hint in command.__annotations__.items() if key != name},
                               **{option.name: option.annotation for option in options}}
        return run

    return decorate


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
        if code == INTERRUPTED:  # Typer answers Ctrl-C with this code and no word
            error_console.print("interrupted (Ctrl-C)")
        if isinstance(code, int) and code:
            sys.exit(code)
    except USER_ERRORS as error:
        report_user_error(error)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        error_console.print("interrupted (Ctrl-C)")
        sys.exit(INTERRUPTED)
    except OSError as error:  # a file system refusal that names its file: read-only, permissions, a full disk
        converted = file_system_error(error)
        if converted is None:
            raise
        report_user_error(converted)
    except Exception as error:
        if _is_usage_error(error):
            error.show()
            sys.exit(error.exit_code)
        raise


def warn(message: str) -> None:
    """One warning line on stderr, as a user error is printed (the command goes on)."""
    error_console.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def report_user_error(error: BaseException) -> None:
    """One line on stderr and exit status 2."""
    # soft_wrap: a path in the message must stay one copyable piece, not be folded at the terminal width; escaped:
    # brackets in a message ("[DCG state_dict, optimizer]", a file name) are text, not markup.
    error_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    sys.exit(2)


def _is_usage_error(error: Exception) -> bool:
    """Click's usage errors (unknown option, extra argument) carry their own message and exit code. Typer
    >= 0.22 raises them from its own copy of click, so both families are checked."""
    import click

    families = (click.ClickException, getattr(typer, "TyperException", click.ClickException))
    return isinstance(error, families) and hasattr(error, "show") and hasattr(error, "exit_code")
