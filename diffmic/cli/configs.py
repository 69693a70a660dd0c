"""`diffmic configs list|show|copy|path`: the experiment configs and launch files, here or packaged."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import UserError, app, config_file, console

configs_app = typer.Typer(no_args_is_help=True, help="""List, print, copy or locate the configs and launch files.

A name (ham10000, reference/ham10000, accelerate/multi_gpu) means, in this order: that path, the file in ./configs/ (or ./launch/), the file packaged with diffmic.

Examples:
  diffmic configs list
  diffmic configs show reference/ham10000
  diffmic configs copy ham10000 configs/   (an editable configs/ham10000.yaml, used from then on)
  accelerate launch --config_file $(diffmic configs path accelerate/multi_gpu) -m diffmic train --dataset ham10000
""")
app.add_typer(configs_app, name="configs")


def _shipped(name: str) -> Path:
    """A config, else a launch file, by the lookup every command uses."""
    from ..packaged import NotFoundError, find_file

    try:
        return find_file(name, "configs", "config")
    except NotFoundError as config_error:
        try:
            return find_file(name, "launch", "launch file")
        except NotFoundError:
            raise UserError(f"{config_error}, nor a launch file of that name; `diffmic configs list` shows the "
                            f"configs") from None


def _config_names() -> dict[str, tuple[Path, str]]:
    """name -> (the file `--config name` reads, where it is), for the local and the packaged configs."""
    from ..packaged import packaged_root, shipped_files

    found: dict[str, tuple[Path, str]] = {}
    for root, where in ((Path("."), "./configs"), (packaged_root(), "packaged")):
        for path in shipped_files(root, "configs"):
            name = path.relative_to(root / "configs").with_suffix("").as_posix()
            if name not in found:
                found[name] = (path, where)
            elif found[name][0].resolve() != path.resolve():
                found[name] = (found[name][0], "./configs*")
    return dict(sorted(found.items()))


@configs_app.command("list")
def list_command() -> None:
    """One line per config (dataset, classes, image size, variant): those in ./configs/ and the packaged ones.

    A config in ./configs/ is used instead of a packaged one of the same name.

    Example: diffmic configs list
    """
    from ..config import ConfigError, load_config

    table = Table(title="configs (--config NAME or --dataset NAME)",
                  caption="* used instead of the packaged config of the same name")
    for column in ("name", "dataset", "classes", "size", "variant", "where"):
        table.add_column(column, justify="right" if column in ("classes", "size") else "left",
                         no_wrap=column in ("name", "where"))
    broken = []
    for name, (path, where) in _config_names().items():
        try:
            cfg = load_config(path)
        except ConfigError as error:
            table.add_row(name, "[red]error[/]", "", "", "", where)
            broken.append(f"{path}: {error}")
            continue
        table.add_row(name, cfg.data.dataset, str(cfg.data.num_classes), str(cfg.data.image_size),
                      cfg.model.variant, where)
    console.print(table)
    for line in broken:
        console.print(f"[red]unreadable:[/] {line}", highlight=False, soft_wrap=True)


@configs_app.command("show")
def show_command(name: str = typer.Argument(..., help="A config name or file, e.g. reference/ham10000.")) -> None:
    """Print a config with its base: chain resolved and every default filled in.

    Example: diffmic configs show reference/ham10000
    """
    from ..config import config_from_dict, config_values, dump_config

    path = config_file(name, None)
    chain: list[Path] = []
    cfg = config_from_dict(config_values(path, chain))
    typer.echo(f"# {name}: {path.resolve()}")
    if len(chain) > 1:
        typer.echo("# base chain: " + " <- ".join(str(part.resolve()) for part in chain))
    typer.echo(dump_config(cfg), nl=False)


@configs_app.command("copy")
def copy_command(
    name: str = typer.Argument(..., help="A config or launch file name, e.g. ham10000 or slurm/train."),
    destination: str = typer.Argument(..., metavar="PATH", help="The new file, or a folder (existing, or ending "
                                                                "in /) to put it in under its own name."),
) -> None:
    """Write an editable copy of a config or launch file (a config's base: chain merged in: it stands alone).

    Examples:
      diffmic configs copy ham10000 configs/        (./configs/ham10000.yaml, used by --dataset ham10000 from then on)
      diffmic configs copy reference/ham10000 my-experiment.yaml
      diffmic configs copy slurm/train train.sbatch
    """
    from ..fileio import write_text_atomic

    source = _shipped(name)
    target = Path(destination)
    if target.is_dir() or destination.endswith("/"):
        target = target / source.name
    if target.exists():
        raise UserError(f"{target} already exists: choose another PATH, or remove it first")
    write_text_atomic(target, _standalone_text(source, name))
    console.print(f"wrote {target} (a copy of {source.resolve()})", highlight=False, soft_wrap=True)


def _standalone_text(source: Path, name: str) -> str:
    """The file as it is, or, for a config that starts from a base, its leading comments and the values
    of the whole chain."""
    import yaml

    from ..config import config_values

    text = source.read_text()
    values = yaml.safe_load(text) if source.suffix == ".yaml" else None
    if not isinstance(values, dict) or "base" not in values:
        return text
    chain: list[Path] = []
    merged = config_values(source, chain)
    comments = [line for line in text.split("\n\n")[0].splitlines() if line.startswith("#")]
    bases = ", ".join(part.name for part in chain[1:])
    comments.append(f"# A copy of {name} with its base chain ({bases}) merged in: it stands alone.")
    return "\n".join(comments) + "\n" + yaml.safe_dump(merged, sort_keys=False)


@configs_app.command("path")
def path_command(
    name: str = typer.Argument(..., help="A config or launch file name, e.g. accelerate/multi_gpu."),
) -> None:
    """Print where a config or launch file is, for tools that need a path (accelerate launch --config_file).

    Examples:
      diffmic configs path accelerate/multi_gpu
      accelerate launch --config_file $(diffmic configs path accelerate/single_gpu) -m diffmic train --dataset ham10000
    """
    typer.echo(str(_shipped(name).resolve()))
