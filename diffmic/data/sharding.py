"""`diffmic shard`: a dataset layout in, verified WebDataset shards and a manifest out.

Everything is written into a temporary folder beside OUT and renamed into place only once the manifest is
complete, so a killed run never leaves shards that look finished. An OUT that is a URL (s3://bucket/prefix)
gets the finished folder's files uploaded, the manifest last (and an old manifest removed first), so a
half-written upload is never taken for a shard folder either. Images are decoded, cropped, resized
and encoded by a process pool; the main process writes the tars in a fixed order, so the bytes do not
depend on the number of workers.
"""

from __future__ import annotations

import csv
import functools
import json
import multiprocessing
import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .. import __version__
from . import storage
from .images import encode_image, preprocess_image
from .layouts import LAYOUTS, Layout
from .manifest import MANIFEST_NAME, Manifest, SplitInfo, read_manifest, write_manifest
from .shardio import SplitShardWriter
from .sources import Problem, Record, ShardError, SourceData
from .splits import apply_given_splits, assign_folds, assign_splits, read_split_files

SHOWN_PROBLEMS = 20
REJECTED_NAME = "rejected.csv"

ProgressCallback = Callable[[int, int], None]  # (images done, images in total)


class ShardWarning(UserWarning):
    """The shards were written, but not quite as asked (the command line prints these as warnings)."""


@dataclass
class ShardOptions:
    """What `diffmic shard` was asked for; None means the documented default."""

    dataset: str  # the layout's name (layouts.py)
    root: Path | None = None  # default: the layout's
    out: Path | str | None = None  # default shards/<name>; a URL (s3://bucket/prefix) uploads there
    name: str | None = None  # default: the --out folder's name, else the dataset
    size: int | None = None  # default: the layout's
    image_format: str = "jpg"
    quality: int = 95
    shard_size: int = 256
    seed: int = 0
    test_fraction: float | None = None  # default: the layout's
    val_fraction: float | None = None  # default 0.1, or 0 with folds (the folds validate)
    folds: int = 0  # K folds over the train split for cross-validation (data.fold); 0: none
    grouped: bool = True
    split_from: list[Path] = field(default_factory=list)
    classes: list[str] | None = None
    skip_bad: bool = False
    overwrite: bool = False
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)

    def __post_init__(self) -> None:
        if self.dataset not in LAYOUTS:
            raise ShardError(f"unknown dataset layout {self.dataset!r}; choose one of {', '.join(LAYOUTS)}")
        layout = self.layout
        self.name = self.name or (storage.basename(self.out) if self.out else self.dataset)
        self.out = storage.as_location(self.out) if self.out else Path("shards") / self.name
        if layout.root is None and self.root is not None:
            raise ShardError(f"--root does not apply to {self.dataset}, which reads no files: {layout.summary}")
        if layout.root is not None:
            self.root = Path(self.root) if self.root else layout.default_root(self.name)
        self.size = self.size or layout.size
        if self.test_fraction is None:
            self.test_fraction = layout.test_fraction
        if self.folds and self.val_fraction:
            raise ShardError(f"--folds {self.folds} validates on each fold in turn: leave out --val-fraction "
                             f"{self.val_fraction} (no val split is carved with folds)")
        if self.val_fraction is None:
            self.val_fraction = 0.0 if self.folds else 0.1
        self._validate()

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.dataset]

    def _validate(self) -> None:
        checks = [(self.size >= 8, f"--size {self.size} is too small; use at least 8 (224 for the paper)"),
                  (self.image_format in ("jpg", "png"), f"--format {self.image_format!r}: use jpg or png"),
                  (1 <= self.quality <= 100, f"--quality {self.quality}: use 1..100"),
                  (self.shard_size >= 1, f"--shard-size {self.shard_size}: use at least 1"),
                  (0 < self.test_fraction < 1, f"--test-fraction {self.test_fraction}: use a value in (0, 1)"),
                  (0 <= self.val_fraction < 1, f"--val-fraction {self.val_fraction}: use a value in [0, 1)"),
                  (self.seed >= 0, f"--seed {self.seed}: use a non-negative integer"),
                  (self.folds == 0 or self.folds >= 2, f"--folds {self.folds}: use at least 2 (or 0 for none)"),
                  (self.workers >= 1, f"--workers {self.workers}: use at least 1"),
                  (not (self.classes and self.layout.fixed_classes),
                   f"--classes does not apply to {self.dataset}, whose classes are fixed")]
        for passed, message in checks:
            if not passed:
                raise ShardError(message)
        if self.classes is not None and (not self.classes or len(set(self.classes)) != len(self.classes)):
            raise ShardError(f"--classes {','.join(self.classes)}: give each class name once")
        if self.root is not None and not self.root.exists():
            raise ShardError(f"{self.root} does not exist: put the {self.dataset} download there or pass --root")


def shard_dataset(options: ShardOptions, progress: ProgressCallback | None = None) -> Manifest:
    """Reads the source, splits it, writes OUT/{split}-NNNNNN.tar and OUT/manifest.json, and returns the
    manifest as read back. Raises ShardError listing every bad input unless `skip_bad`."""
    check_output(options.out, options.overwrite)
    source = options.layout.read(options.root, options.classes, options.size)
    records, problems = source.records, list(source.problems)
    if options.split_from:
        described = " and ".join(str(path) for path in options.split_from)
        records = apply_given_splits(records, problems, read_split_files(options.split_from), described)
    require_every_class(records, source.classes, "")
    groups = options.layout.groups
    if options.grouped and groups and not any(record.group for record in records):
        warnings.warn(ShardWarning(
            f"no {groups} in the metadata of {options.root}: the splits are made image by image, so images of one "
            f"lesion can land in both train and test (which flatters the test scores); HAM10000_metadata.csv as "
            f"downloaded has a {groups} column"), stacklevel=2)
    splits = assign_splits(records, options.test_fraction, options.val_fraction, options.seed, options.grouped)
    if options.val_fraction > 0 and "val" not in splits:
        warnings.warn(ShardWarning(
            f"no val split: --val-fraction {options.val_fraction} of {len(splits['train'])} training images rounds "
            f"to none in every class, and training validates on val by default; shard again with a larger "
            f"--val-fraction (e.g. 0.2) and --overwrite, or train with --set train.val_every=0"), stacklevel=2)
    work = make_work_folder(options.out)
    try:
        infos, rejected = encode_splits(splits, source.classes, work, options, progress)
        problems += rejected
        if problems and not options.skip_bad:
            raise ShardError(describe_problems(problems, options))
        unreadable = {problem.key for problem in rejected}
        require_every_class([record for split in splits.values() for record in split
                             if record.key not in unreadable], source.classes, " after leaving out the rejected images")
        if problems:
            write_rejected(work / REJECTED_NAME, problems)
        write_manifest(build_manifest(options, source, splits, infos, len(problems)), work)
        publish(work, options.out, options.overwrite)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return read_manifest(options.out)


def make_work_folder(out: Path | str) -> Path:
    """A fresh hidden folder beside OUT (same file system, so the final rename is atomic), created with
    the user's umask rather than mkdtemp's 0700: the published shards must be readable by the team. For a
    URL, a temporary folder of this machine, from which the files are uploaded."""
    if storage.is_url(out):
        return Path(tempfile.mkdtemp(prefix="diffmic-shard-"))
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        work = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            work.mkdir()
            return work
        except FileExistsError:
            continue


def check_output(out: Path | str, overwrite: bool) -> None:
    if storage.is_url(out):
        check_remote_output(out, overwrite)
        return
    if out.exists() and not out.is_dir():
        raise ShardError(f"{out} is a file, not a folder: choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ShardError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    if not (out / MANIFEST_NAME).is_file():
        raise ShardError(f"refusing to overwrite {out}: it holds no {MANIFEST_NAME}, so it is not a diffmic "
                         f"shard folder; remove it yourself or choose another --out")


def check_remote_output(out: str, overwrite: bool) -> None:
    """The same rules at a URL: an empty prefix, or with --overwrite one that holds a diffmic manifest."""
    if storage.bucket_missing(out):
        raise ShardError(f"{out}: the bucket {storage.bucket_of(out)!r} does not exist at this endpoint: create "
                         f"it first, or fix the URL (and the endpoint the storage client finds)")
    found = storage.list_sizes(out)
    if not found:
        return
    if not overwrite:
        raise ShardError(f"{out} already holds {len(found)} object(s): pass --overwrite to replace a shard folder "
                         f"there, or choose another --out")
    if MANIFEST_NAME not in found:
        raise ShardError(f"refusing to overwrite {out}: it holds no {MANIFEST_NAME}, so it is not a diffmic shard "
                         f"folder; remove its objects yourself or choose another --out")


def require_every_class(records: list[Record], classes: list[str], when: str) -> None:
    present = {record.label for record in records}
    empty = [name for label, name in enumerate(classes) if label not in present]
    if empty:
        raise ShardError(f"class(es) {', '.join(empty)} have no images{when}: add images, or name only the "
                         f"classes you have with --classes (where the layout allows it)")


def encode_record(record: Record, size: int, image_format: str, quality: int) -> tuple[bytes | None, list, str]:
    """(encoded image, original [width, height], "") or (None, [], reason): runs in a worker process.
    Any failure to read one file is that file's problem, so every exception becomes its reason."""
    try:
        if record.pixels is not None:
            image = Image.fromarray(record.pixels)
            return encode_image(preprocess_image(image, size), image_format, quality), list(image.size), ""
        with Image.open(record.path) as image:
            image.load()  # decodes everything now, so a truncated file fails here and not later
            return encode_image(preprocess_image(image, size), image_format, quality), list(image.size), ""
    except Exception as error:  # noqa: BLE001 - see docstring
        return None, [], f"cannot read the image ({type(error).__name__}: {error})"


def _encoded_stream(records: list[Record], options: ShardOptions):
    encode = functools.partial(encode_record, size=options.size, image_format=options.image_format,
                               quality=options.quality)
    if options.workers == 1 or len(records) < 2:
        yield from map(encode, records)
        return
    # fork starts workers in milliseconds and they need only PIL; spawn where fork does not exist.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(min(options.workers, len(records))) as pool:
        yield from pool.imap(encode, records, chunksize=8)


def encode_splits(splits: dict[str, list[Record]], classes: list[str], work: Path, options: ShardOptions,
                  progress: ProgressCallback | None) -> tuple[dict[str, SplitInfo], list[Problem]]:
    ordered = [(name, record) for name, records in splits.items() for record in records]
    writers = {name: SplitShardWriter(work, name, options.shard_size) for name in splits}
    keys: dict[str, list[str]] = {name: [] for name in splits}
    counts = {name: dict.fromkeys(classes, 0) for name in splits}
    rejected = []
    encoded = _encoded_stream([record for _, record in ordered], options)
    for done, ((split, record), (image, original, reason)) in enumerate(zip(ordered, encoded), start=1):
        if image is None:
            rejected.append(Problem(record.source, reason, record.key))
        else:
            meta = {"source": record.source, "original_size": original, "class": classes[record.label]}
            if record.group:
                meta["lesion_id"] = record.group
            writers[split].add(record.key, {options.image_format: image, "cls": str(record.label).encode(),
                                            "json": json.dumps(meta, sort_keys=True).encode()})
            keys[split].append(record.key)
            counts[split][classes[record.label]] += 1
        if progress is not None:
            progress(done, len(ordered))
    infos = {name: SplitInfo(count=len(keys[name]), class_counts=counts[name], shards=writers[name].finish(),
                             keys=keys[name]) for name in splits}
    if options.folds:
        fold_of = assign_folds(splits["train"], options.folds, options.seed, options.grouped)
        infos["train"].folds = [fold_of[key] for key in keys["train"]]
        empty = sorted(set(range(options.folds)) - set(infos["train"].folds))
        if empty:
            raise ShardError(f"--folds {options.folds}: fold(s) {', '.join(map(str, empty))} would be empty with "
                             f"{len(keys['train'])} training images; use fewer folds")
    return infos, rejected


def describe_problems(problems: list[Problem], options: ShardOptions) -> str:
    shown = [f"  {problem.source}: {problem.reason}" for problem in problems[:SHOWN_PROBLEMS]]
    if len(problems) > SHOWN_PROBLEMS:
        shown.append(f"  ... and {len(problems) - SHOWN_PROBLEMS} more")
    where = options.root if options.root is not None else options.dataset
    return (f"{len(problems)} problem(s) in {where}; nothing was written:\n" + "\n".join(shown) + "\n"
            f"Fix these inputs, or pass --skip-bad to leave them out (each is then listed with its reason in "
            f"{storage.join(options.out, REJECTED_NAME)}).")


def write_rejected(path: Path, problems: list[Problem]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "key", "reason"])
        writer.writerows([problem.source, problem.key, problem.reason] for problem in problems)


def build_manifest(options: ShardOptions, source: SourceData, splits: dict[str, list[Record]],
                   infos: dict[str, SplitInfo], rejected: int) -> Manifest:
    given = {record.split for records in splits.values() for record in records if record.split}  # fixed splits
    grouped = options.grouped and any(record.group for records in splits.values() for record in records)
    for name, info in infos.items():
        if info.count == 0:
            raise ShardError(f"the {name} split is empty: use more images or larger split fractions")
    return Manifest(
        dataset=options.name, source=options.dataset, classes=source.classes, image_size=options.size,
        image_format=options.image_format,
        preprocessing={"crop": "centre square", "resize": "bicubic", "color": "RGB",
                       "quality": options.quality if options.image_format == "jpg" else None},
        split={"seed": options.seed, "test_fraction": None if "test" in given else options.test_fraction,
               "val_fraction": None if "val" in given else options.val_fraction,
               "grouped_by_lesion": grouped, "given_by": [str(path) for path in options.split_from]
               or ([options.dataset] if given else []), **({"folds": options.folds} if options.folds else {})},
        splits=infos, rejected=rejected, tool=f"diffmic {__version__}",
        source_root=str(options.root.resolve()) if options.root is not None else source.origin)


def publish(work: Path, out: Path | str, overwrite: bool) -> None:
    """Renames the finished folder into place; an old OUT is moved aside first and removed last, so OUT
    is at every moment either the old complete output, absent, or the new complete output."""
    if storage.is_url(out):
        upload(work, out, overwrite)
        return
    if out.exists():
        check_output(out, overwrite)
        retired = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, retired)
        os.rename(work, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(work, out)


def upload(work: Path, out: str, overwrite: bool) -> None:
    """Uploads the finished folder to OUT: an old manifest is removed first, the shards are put, objects the new
    folder does not have are removed, and the manifest is put last. A reader meanwhile finds no manifest, and
    so a folder that is not finished; the work folder is removed either way."""
    try:
        check_remote_output(out, overwrite)
        old = storage.list_sizes(out)
        if MANIFEST_NAME in old:
            storage.remove(storage.join(out, MANIFEST_NAME))
        files = sorted(path for path in work.iterdir() if path.name != MANIFEST_NAME)
        for path in files:
            storage.upload_file(path, storage.join(out, path.name))
        for stale in sorted(set(old) - {path.name for path in files} - {MANIFEST_NAME}):
            storage.remove(storage.join(out, stale))
        storage.upload_file(work / MANIFEST_NAME, storage.join(out, MANIFEST_NAME))
    finally:
        shutil.rmtree(work, ignore_errors=True)
