"""`diffmic shard`, `diffmic verify`, `diffmic info`: parse options, call diffmic.data, show the result."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer
from rich.table import Table

from ..data.layouts import LAYOUTS
from ..data.storage import join
from ..progress import ProgressBar
from .common import app, console, error_console


def _by_default(value_of) -> str:
    """`0.3 (ham10000, aptos2019, digits), 0.2 (imagefolder, pkl, medmnist)`: a default that depends on
    the layout, written from the layout registry."""
    groups: dict[str, list[str]] = {}
    for layout in LAYOUTS.values():
        groups.setdefault(str(value_of(layout)), []).append(layout.name)
    return ", ".join(f"{value} ({', '.join(names)})" for value, names in groups.items())


def _shown_root(layout) -> str:
    return layout.root.format(name="<name>") if layout.root else "none: it reads no files"


def _layouts_epilog() -> str:
    return "Layouts (--dataset):\n\n" + "\n\n".join(f"  {layout.name}: {layout.summary}" for layout in LAYOUTS.values())


@app.command("shard", epilog=_layouts_epilog())
def shard(
    dataset: str = typer.Option(..., "--dataset", "-d", help=f"Source layout: {', '.join(LAYOUTS)} (see below)."),
    root: Path = typer.Option(None, "--root", help="The download's folder (or file, for pkl and medmnist). Default: "
                              + _by_default(_shown_root) + "; <name> is --name."),
    out: str = typer.Option(None, "--out", "-o", help="Output folder, or a URL (s3://bucket/prefix). Default: "
                                                       "shards/<name>."),
    name: str = typer.Option(None, "--name", help="Dataset name in the manifest and default paths. Default: the "
                                                  "--out folder's name, else the layout."),
    size: int = typer.Option(None, "--size", help="Square image side in pixels. Default "
                             + _by_default(lambda layout: layout.size) + "."),
    image_format: str = typer.Option("jpg", "--format", help="jpg or png."),
    quality: int = typer.Option(95, "--quality", help="JPEG quality."),
    shard_size: int = typer.Option(256, "--shard-size", help="Samples per shard."),
    seed: int = typer.Option(0, "--seed", help="Seed of the splits and the sample order."),
    test_fraction: float = typer.Option(None, "--test-fraction",
                                        help="Test share. Default " + _by_default(lambda layout: layout.test_fraction)
                                             + ". Unused when the source or --split-from gives a test split."),
    val_fraction: float = typer.Option(None, "--val-fraction", help="Validation share carved from train; 0: none. "
                                                                    "Default 0.1 (0 with --folds)."),
    folds: int = typer.Option(0, "--folds", help="Also deal the train split into K folds (stratified, lesions kept "
                                                 "together) for cross-validation: train with --set data.fold=i."),
    group: bool = typer.Option(True, "--group/--no-group", help="Keep each lesion in one split (HAM10000 "
                                                                "metadata); --no-group: the authors' image split."),
    split_from: list[Path] = typer.Option(None, "--split-from", help="Use a given split: a CSV of key,split or "
                                                                     "the authors' .pkl lists (repeatable)."),
    classes: str = typer.Option(None, "--classes", help="Comma-separated class names in label order ("
                                + ", ".join(name for name, layout in LAYOUTS.items() if not layout.fixed_classes)
                                + "; the others' classes are fixed)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave out bad inputs, listed in OUT/rejected.csv."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
    workers: int = typer.Option(None, "--workers", help="Encoding processes. Default: all cores."),
) -> None:
    """Turn a downloaded dataset into WebDataset shards with a manifest.

    Examples:
      diffmic shard --dataset ham10000   (reads data/ham10000, writes shards/ham10000)
      diffmic shard --dataset aptos2019 --size 384
      diffmic shard --dataset imagefolder --root data/pmg2000 --out shards/pmg2000
      diffmic shard --dataset imagefolder --root data/pmg2000 --out shards/pmg2000-cv --folds 5
      diffmic shard --dataset ham10000 --split-from train.pkl --split-from test.pkl   (the authors' split)
    """
    from ..data import ShardOptions, ShardWarning, shard_dataset

    options = ShardOptions(
        dataset=dataset, root=root, out=out, name=name, size=size, image_format=image_format, quality=quality,
        shard_size=shard_size, seed=seed, test_fraction=test_fraction, val_fraction=val_fraction, folds=folds, grouped=group,
        split_from=list(split_from or []), skip_bad=skip_bad, overwrite=overwrite,
        classes=[part.strip() for part in classes.split(",")] if classes else None,
        **({"workers": workers} if workers is not None else {}))
    with ProgressBar(f"sharding {options.name}", console=error_console) as bar, \
            warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", ShardWarning)
        manifest = shard_dataset(options, progress=bar.report)
    console.print(_counts_table(manifest))
    for warning in said:
        error_console.print(f"[bold yellow]warning:[/] {warning.message}", highlight=False, soft_wrap=True)
    if manifest.rejected:
        console.print(f"[yellow]{manifest.rejected} input(s) left out: see {join(options.out, 'rejected.csv')}[/]")
    console.print(f"wrote {options.out}; check it any time with: diffmic verify {options.out}")


@app.command("verify")
def verify(shard_dir: str = typer.Argument(..., help="A folder made by diffmic shard, or its URL.")) -> None:
    """Re-read every shard: sha256, sizes, sample counts, keys, labels, and that every image decodes.

    Names each problem and exits non-zero when anything is wrong.

    Example: diffmic verify shards/ham10000
    """
    from ..data import ManifestError, read_manifest, verify_shards

    manifest = read_manifest(shard_dir)
    with ProgressBar(f"verifying {shard_dir}", console=error_console) as bar:
        problems = verify_shards(shard_dir, progress=bar.report)
    if problems:
        for problem in problems:
            error_console.print(f"[bold red]problem:[/] {problem}", highlight=False)
        raise ManifestError(f"{len(problems)} problem(s) in {shard_dir}: re-create it with `diffmic shard ... "
                            f"--out {shard_dir} --overwrite`")
    shards = sum(len(info.shards) for info in manifest.splits.values())
    samples = sum(info.count for info in manifest.splits.values())
    console.print(f"{shard_dir}: OK, {shards} shards and {samples} samples match the manifest "
                  f"(sha256 {manifest.digest[:12]})")


@app.command("info")
def info(shard_dir: str = typer.Argument(..., help="A folder made by diffmic shard, or its URL.")) -> None:
    """Print the classes and per-split counts of a shard folder.

    Example: diffmic info shards/ham10000
    """
    from ..data import read_manifest

    manifest = read_manifest(shard_dir)
    split = {key: "given" if value is None else value for key, value in manifest.split.items()}
    console.print(f"{manifest.dataset} ({manifest.source} layout, {manifest.tool}): {manifest.image_size}px "
                  f"{manifest.image_format}, seed {split.get('seed')}, test fraction {split.get('test_fraction')}, "
                  f"val fraction {split.get('val_fraction')}, grouped by lesion: {split.get('grouped_by_lesion')}, "
                  f"{manifest.fold_count or 'no'} cross-validation folds, "
                  f"{manifest.rejected} rejected", highlight=False)
    console.print(_counts_table(manifest))


def _counts_table(manifest) -> Table:
    table = Table(title=f"{manifest.folder}")
    table.add_column("label", justify="right")
    table.add_column("class")
    for name in manifest.splits:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    for label, cls in enumerate(manifest.classes):
        counts = [info.class_counts[cls] for info in manifest.splits.values()]
        table.add_row(str(label), cls, *map(str, counts), str(sum(counts)))
    totals = [info.count for info in manifest.splits.values()]
    table.add_row("", "all", *map(str, totals), str(sum(totals)), style="bold")
    table.add_row("", "shards", *(str(len(info.shards)) for info in manifest.splits.values()), "")
    return table
