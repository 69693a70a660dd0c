"""Launching on clusters: Slurm jobs through submitit (`diffmic train --slurm`, `diffmic eval --slurm`)."""

from dataclasses import field


def flag(default, name: str, help: str):
    """A dataclass field that is also a command-line flag: diffmic.cli.launch declares the Typer option from this
    metadata, so a new launch flag is one field (plus its use)."""
    return field(default=default, metadata={"flag": name, "help": help})
