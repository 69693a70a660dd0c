"""The dataset layouts users download, read into one list of records (key, label, where the image is).

Readers only look at names and labels; decoding happens later in the sharding workers. Problems a user
can fix file by file (a missing image, an unknown label, a duplicate id) become `Problem`s, so a run can
list all of them at once or skip them with --skip-bad; a layout that cannot be read at all (no CSV, wrong
columns) raises `ShardError` straight away.
"""

from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from .images import IMAGE_SUFFIXES
from .layouts import Layout, register
from .shardio import safe_key


class ShardError(UserError, ValueError):
    """The source data cannot be sharded as given; the message names the file and the fix."""


@dataclass(eq=False)
class Record:
    key: str
    label: int
    source: str  # the image file (relative to the root when inside it), or what an in-memory image is
    path: Path | None = None
    pixels: np.ndarray | None = None  # in-memory image (digits, MedMNIST) instead of a file
    group: str | None = None  # lesion id: images of one lesion stay in one split
    split: str | None = None  # a split fixed by the source itself (MedMNIST, the authors' lists)


@dataclass(frozen=True)
class Problem:
    source: str
    reason: str
    key: str = ""  # the sample id it concerns, when known


@dataclass
class SourceData:
    classes: list[str]
    records: list[Record]
    problems: list[Problem] = field(default_factory=list)
    origin: str = ""  # where the images come from when the layout reads no --root (the manifest's source_root)


HAM_CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
HAM_METADATA = "HAM10000_metadata.csv"
ISIC_GROUND_TRUTH = "ISIC2018_Task3_Training_GroundTruth.csv"
ISIC_IMAGES = "ISIC2018_Task3_Training_Input"
APTOS_CLASSES = ["no_dr", "mild", "moderate", "severe", "proliferative_dr"]


def relative_name(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def read_csv(path: Path, required: list[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs; ShardError naming the file when a required column is missing or no row
    follows the header."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        try:
            columns = [name.strip() for name in reader.fieldnames or []]
            missing = [name for name in required if name not in columns]
            if missing:
                raise ShardError(f"{path} lacks the column(s) {', '.join(missing)} (it has: "
                                 f"{', '.join(columns) or 'no header'}); check --dataset and use the file as "
                                 f"downloaded")
            rows = [(number, {(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str)})
                    for number, row in enumerate(reader, start=2)]
        except (csv.Error, UnicodeDecodeError) as error:
            raise ShardError(f"{path} does not read as CSV near line {reader.line_num} ({error}); use the file as "
                             f"downloaded") from None
    for number, row in rows:
        if any("\n" in value or "\r" in value for value in row.values()):  # no id or label spans lines
            raise ShardError(f"{path} line {number}: a quote opened on this line is never closed, so the lines "
                             f"after it read as one value; fix the quote or use the file as downloaded")
    if not rows:
        raise ShardError(f"{path} has a header but no rows; use the complete file as downloaded")
    return rows


def index_images(folders: list[Path]) -> dict[str, list[Path]]:
    """Image files below `folders` by file stem, in a stable order (hidden files ignored)."""
    index: dict[str, list[Path]] = defaultdict(list)
    for folder in folders:
        for directory, subfolders, files in os.walk(folder):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            for name in sorted(files):
                path = Path(directory) / name
                if not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES:
                    index[path.stem].append(path)
    return index


class RecordBuilder:
    """Collects records and problems for one source and finds images by id."""

    def __init__(self, root: Path, index: dict[str, list[Path]] | None = None):
        self.root, self.index = root, index or {}
        self.records: list[Record] = []
        self.problems: list[Problem] = []

    def problem(self, source: str | Path, reason: str, key: str = "") -> None:
        source = relative_name(source, self.root) if isinstance(source, Path) else source
        self.problems.append(Problem(source, reason, safe_key(key) if key else ""))

    def add_by_id(self, image_id: str, label: int, expected: Path, group: str | None = None,
                  split: str | None = None) -> None:
        """Finds `image_id` in the image index; a missing or ambiguous image becomes a problem."""
        found = self.index.get(image_id, [])
        if not found:
            self.problem(expected, "image file is missing", key=image_id)
        elif len(found) > 1:
            self.problem(found[0], "the same image id is also at "
                         + ", ".join(relative_name(path, self.root) for path in found[1:]), key=image_id)
        else:
            self.add_file(found[0], image_id, label, group, split)

    def add_file(self, path: Path, key: str, label: int, group: str | None = None,
                 split: str | None = None) -> None:
        self.records.append(Record(key=safe_key(key), label=label, source=relative_name(path, self.root),
                                   path=path, group=group, split=split))

    def result(self, classes: list[str]) -> SourceData:
        """Records whose key occurs once; every occurrence of a duplicated key becomes a problem,
        because which one is right cannot be guessed."""
        counts = Counter(record.key for record in self.records)
        unique = [record for record in self.records if counts[record.key] == 1]
        for record in self.records:
            if counts[record.key] > 1:
                self.problem(record.source, f"duplicate id {record.key} ({counts[record.key]} images share it)",
                             key=record.key)
        return SourceData(classes=classes, records=unique, problems=self.problems)


def find_file(root: Path, name: str) -> Path | None:
    """`root/name`, else the first `root/*/name`: downloads often unpack into one extra folder."""
    candidates = [root / name, *sorted(root.glob(f"*/{name}"))]
    return next((path for path in candidates if path.is_file()), None)


def image_folders(root: Path, pattern: str) -> list[Path]:
    found = sorted(path for path in [*root.glob(pattern), *root.glob(f"*/{pattern}")] if path.is_dir())
    return found or [root]


def read_ham10000(root: Path) -> SourceData:
    metadata, truth = find_file(root, HAM_METADATA), find_file(root, ISIC_GROUND_TRUTH)
    if metadata is not None:
        return _read_ham_metadata(root, metadata)
    if truth is not None:
        return _read_isic_ground_truth(root, truth)
    raise ShardError(f"{root} holds neither {HAM_METADATA} nor {ISIC_GROUND_TRUTH} (looked in it and one "
                     f"folder down): unpack the HAM10000 or ISIC 2018 task 3 download there, or pass --root")


def _read_ham_metadata(root: Path, metadata: Path) -> SourceData:
    """HAM10000_metadata.csv: image_id, dx (lower-case class), lesion_id; images in HAM10000_images*/."""
    rows = read_csv(metadata, ["image_id", "dx"])
    builder = RecordBuilder(root, index_images(image_folders(root, "HAM10000_images*")))
    names = [name.lower() for name in HAM_CLASSES]
    for line, row in rows:
        if row["dx"].lower() not in names:
            builder.problem(f"{relative_name(metadata, root)}:{line}",
                            f"unknown label dx={row['dx']!r}; expected one of {', '.join(names)}",
                            key=row["image_id"])
            continue
        builder.add_by_id(row["image_id"], names.index(row["dx"].lower()), root / f"{row['image_id']}.jpg",
                          group=row.get("lesion_id") or None)
    return builder.result(HAM_CLASSES)


def _read_isic_ground_truth(root: Path, truth: Path) -> SourceData:
    """ISIC2018_Task3_Training_GroundTruth.csv: image plus one-hot columns MEL..VASC."""
    rows = read_csv(truth, ["image", *HAM_CLASSES])
    builder = RecordBuilder(root, index_images(image_folders(root, ISIC_IMAGES)))
    for line, row in rows:
        try:
            hot = [index for index, name in enumerate(HAM_CLASSES) if float(row[name]) == 1.0]
            valid = len(hot) == 1 and all(float(row[name]) in (0.0, 1.0) for name in HAM_CLASSES)
        except ValueError:
            valid = False
        if not valid:
            builder.problem(f"{relative_name(truth, root)}:{line}",
                            f"unknown label: the columns {', '.join(HAM_CLASSES)} must hold one 1 and six 0s")
            continue
        builder.add_by_id(row["image"], hot[0], root / ISIC_IMAGES / f"{row['image']}.jpg")
    return builder.result(HAM_CLASSES)


HAM10000 = register(Layout(
    "ham10000", read_ham10000, "HAM10000_metadata.csv (splits grouped by lesion_id) or the ISIC 2018 task 3 "
    "ground-truth CSV, with their images", test_fraction=0.3, classes=tuple(HAM_CLASSES), root="data/ham10000",
    groups="lesion_id"))


def read_aptos2019(root: Path) -> SourceData:
    """train.csv (id_code, diagnosis 0-4) and train_images/<id_code>.png."""
    table = root / "train.csv"
    if not table.is_file():
        raise ShardError(f"{table} does not exist: unpack the APTOS 2019 download (train.csv, train_images/) "
                         f"into {root}, or pass --root")
    builder = RecordBuilder(root, index_images([root / "train_images"]))
    for line, row in read_csv(table, ["id_code", "diagnosis"]):
        grade = row["diagnosis"]
        if not (grade.isdigit() and int(grade) < len(APTOS_CLASSES)):
            builder.problem(f"train.csv:{line}", f"unknown label diagnosis={grade!r}; expected 0-4")
            continue
        builder.add_by_id(row["id_code"], int(grade), root / "train_images" / f"{row['id_code']}.png")
    return builder.result(APTOS_CLASSES)


APTOS2019 = register(Layout(
    "aptos2019", read_aptos2019, "train.csv (id_code, diagnosis 0-4) and train_images/<id_code>.png",
    test_fraction=0.3, classes=tuple(APTOS_CLASSES), root="data/aptos2019"))


def read_imagefolder(root: Path, classes: list[str] | None) -> SourceData:
    """ROOT/<class>/**/<image>; classes in sorted folder order unless --classes gives the order."""
    folders = sorted(path.name for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not folders:
        raise ShardError(f"{root} has no class folders: imagefolder expects {root}/<class name>/<images>")
    if classes and (extra := [name for name in folders if name not in classes]):
        raise ShardError(f"folder(s) {', '.join(extra)} in {root} are not in --classes: add them to the "
                         f"list or move them out of {root}")
    classes = classes or folders
    builder = RecordBuilder(root)
    for label, name in enumerate(classes):
        for paths in index_images([root / name] if (root / name).is_dir() else []).values():
            for path in paths:
                key = f"{name}/{path.relative_to(root / name).with_suffix('')}"
                builder.add_file(path, key, label)
    return builder.result(classes)


IMAGEFOLDER = register(Layout(
    "imagefolder", read_imagefolder, "ROOT/<class>/<images>, such as PMG2000; classes in sorted folder order "
    "unless --classes gives it", test_fraction=0.2))


def numbered_classes(labels: list[int], classes: list[str] | None) -> list[str]:
    """--classes when given, else "0", "1", ... up to the largest label."""
    return classes or [str(index) for index in range(max(max(labels, default=0) + 1, 2))]
