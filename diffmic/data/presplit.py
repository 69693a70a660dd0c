"""Sources that arrive already split: the authors' pickled lists and a local MedMNIST `.npz`."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .layouts import Layout, register
from .manifest import SPLIT_NAMES
from .safepickle import UnsafePickleError, load_plain_pickle
from .sources import Record, RecordBuilder, ShardError, SourceData, index_images, numbered_classes, safe_key


def split_named_by(path: Path) -> str:
    """The split a list file holds, read from its name (`ISIC2018_train.pkl` -> train)."""
    named = [split for split in SPLIT_NAMES if split in path.stem.lower()]
    if len(named) != 1:
        raise ShardError(f"cannot tell which split {path} holds: its name must contain exactly one of "
                         f"{', '.join(SPLIT_NAMES)}; rename it, e.g. to train.pkl")
    return named[0]


def load_split_list(path: Path) -> list:
    """The entries of one pickled list, loaded without running anything in it."""
    try:
        entries = load_plain_pickle(path)
    except UnsafePickleError as error:
        raise ShardError(f"{error}. Re-create the list from plain lists and dicts, or give the split as a "
                         f"CSV of key,split with --split-from") from None
    if not isinstance(entries, list):
        raise ShardError(f"{path} holds a {type(entries).__name__}, not a list of {{'img_root', 'label'}} "
                         f"entries; is it one of the authors' split lists?")
    return entries


def is_list_entry(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("img_root"), str)
            and isinstance(entry.get("label"), int) and not isinstance(entry.get("label"), bool))


def list_key(img_root: str) -> str:
    """The sample key of a list entry: the image's file stem, as the CSV layouts name their ids."""
    return safe_key(Path(img_root.replace("\\", "/")).stem)


class _ImageResolver:
    """Finds an entry's image: the path as written (relative to the root unless absolute), else a
    unique file of that name under the root (the authors' lists carry their own machine's paths)."""

    def __init__(self, root: Path):
        self.root = root
        self._by_name: dict[str, list[Path]] | None = None

    def __call__(self, img_root: str) -> Path | None:
        written = Path(img_root.replace("\\", "/"))
        candidate = written if written.is_absolute() else self.root / written
        if candidate.is_file():
            return candidate
        if self._by_name is None:
            self._by_name = {}
            for paths in index_images([self.root]).values():
                for path in paths:
                    self._by_name.setdefault(path.name, []).append(path)
        found = self._by_name.get(written.name, [])
        return found[0] if len(found) == 1 else None


def read_pkl(root: Path, classes: list[str] | None) -> SourceData:
    """A folder of pickled lists of {'img_root', 'label'} (or one such file); the split comes from each
    file's name, class names from --classes (default "0", "1", ...)."""
    files = [root] if root.is_file() else sorted(root.glob("*.pkl"))
    base = root.parent if root.is_file() else root
    if not files:
        raise ShardError(f"no .pkl split lists in {root}: put the lists there (names containing train, val "
                         f"or test) or pass --root")
    builder, resolve = RecordBuilder(base), _ImageResolver(base)
    for file in files:
        split = split_named_by(file)
        for number, entry in enumerate(load_split_list(file)):
            where = f"{file.name}[{number}]"
            if not is_list_entry(entry):
                builder.problem(where, "expected an entry {'img_root': <path>, 'label': <integer>}")
            elif entry["label"] < 0:
                builder.problem(where, f"unknown label {entry['label']}")
            elif (path := resolve(entry["img_root"])) is None:
                builder.problem(entry["img_root"], "image file is missing", key=list_key(entry["img_root"]))
            else:
                builder.add_file(path, list_key(entry["img_root"]), entry["label"], split=split)
    classes = numbered_classes([record.label for record in builder.records], classes)
    for record in [record for record in builder.records if record.label >= len(classes)]:
        builder.records.remove(record)
        builder.problem(record.source, f"unknown label {record.label}: --classes names {len(classes)} classes")
    return builder.result(classes)


PKL = register(Layout(
    "pkl", read_pkl, "the authors' pickled lists of {'img_root', 'label'} (a folder of them or one .pkl file); "
    "each file's name gives its split, --classes the class names", test_fraction=0.2))


def _npz_file(root: Path) -> Path:
    if root.is_file():
        return root
    found = sorted(root.glob("*.npz")) if root.is_dir() else []
    if len(found) != 1:
        raise ShardError(f"expected one MedMNIST .npz file at {root}, found {len(found)}: pass --root FILE.npz")
    return found[0]


def _medmnist_split(npz, path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ShardError(f"{path}: {split}_labels has shape {labels.shape}; multi-label MedMNIST sets "
                         f"(ChestMNIST) are not single-label classification and are not supported")
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
        raise ShardError(f"{path}: {split}_images must be uint8 (N, H, W) or (N, H, W, 3) with one label "
                         f"per image, got {images.dtype} {images.shape} for {len(labels)} labels")
    return images, labels.astype(np.int64)


def read_medmnist(root: Path, classes: list[str] | None) -> SourceData:
    """A MedMNIST .npz with {train,val,test}_{images,labels}; its own splits are kept."""
    path = _npz_file(root)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [f"{split}_{part}" for split in SPLIT_NAMES for part in ("images", "labels")
                       if f"{split}_{part}" not in npz.files]
            if missing:
                raise ShardError(f"{path} lacks {', '.join(missing)}: is it a MedMNIST .npz file?")
            arrays = {split: _medmnist_split(npz, path, split) for split in SPLIT_NAMES}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        if isinstance(error, ShardError):
            raise
        raise ShardError(f"{path} is not a readable .npz file ({error}); download it again") from None
    all_labels = [int(label) for _, labels in arrays.values() for label in labels]
    classes = numbered_classes(all_labels, classes)
    builder = RecordBuilder(path.parent)
    for split, (images, labels) in arrays.items():
        for index, (image, label) in enumerate(zip(images, labels)):
            source = f"{path.name}:{split}_images[{index}]"
            if not 0 <= label < len(classes):
                builder.problem(source, f"unknown label {int(label)}: there are {len(classes)} classes")
                continue
            builder.records.append(Record(key=f"{split}_{index:06d}", label=int(label), source=source,
                                          pixels=image, split=split))
    return builder.result(classes)


MEDMNIST = register(Layout(
    "medmnist", read_medmnist, "a MedMNIST .npz (the folder holding it or the file); its train/val/test splits "
    "are kept", test_fraction=0.2))
