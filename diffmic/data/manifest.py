"""`manifest.json`: what a shard folder holds. Every reader goes through `read_manifest`, so a missing,
truncated or hand-edited manifest fails the same way everywhere, with the fix in the message."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from . import storage
from .storage import ShardFile, StorageError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
SPLIT_NAMES = ("train", "val", "test")


class ManifestError(UserError, ValueError):
    """A shard folder is missing, unfinished or inconsistent; the message names the file and the fix."""


class CorruptShardError(ManifestError):
    """A shard differs from its manifest entry or does not read as a tar: one line naming the shard and
    `diffmic verify`."""


@dataclass(frozen=True)
class ShardEntry:
    file: str  # name inside the shard folder
    count: int
    sha256: str
    bytes: int


@dataclass
class SplitInfo:
    count: int
    class_counts: dict[str, int]  # class name -> samples, in class order
    shards: list[ShardEntry]
    keys: list[str]  # every sample key, in shard order
    folds: list[int] | None = None  # the cross-validation fold of each key (train split of `shard --folds K`)


@dataclass(frozen=True)
class Selection:
    """The samples one stream reads: some shards and, of their samples, those in `keep` (all when None).
    With `data.fold = i` the train stream reads the train split without fold i and validation reads fold i
    from the same shards: folds select samples, they are never sharded apart."""

    name: str  # what it is, for messages: "train", "val", "train without fold 2", "fold 2 of train"
    shards: list[ShardEntry]
    counts: list[int]  # selected samples per shard
    keys: list[str]  # the selected keys, in shard order
    keep: frozenset[str] | None = None

    @property
    def count(self) -> int:
        return len(self.keys)


@dataclass
class Manifest:
    dataset: str
    source: str  # the --dataset layout it was made from
    classes: list[str]
    image_size: int
    image_format: str
    preprocessing: dict
    split: dict  # how the splits were made: seed, fractions, grouping, split file
    splits: dict[str, SplitInfo]
    rejected: int
    tool: str
    source_root: str
    path: Path | str = field(default=Path(), compare=False)  # the manifest file itself: a local path or a URL
    digest: str = field(default="", compare=False)  # sha256 of manifest.json's bytes

    @property
    def folder(self) -> Path | str:
        """The shard folder: a local path, or the URL of a remote one (storage.py)."""
        return storage.parent(self.path)

    def shard_file(self, entry: ShardEntry) -> ShardFile:
        """Where one shard is and what it must hold, as the streams open it."""
        return ShardFile(str(storage.join(self.folder, entry.file)), entry.sha256, entry.bytes)

    def split_info(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ManifestError(f"{self.path} has no '{name}' split; available: {', '.join(self.splits)}. "
                                f"Re-shard with a split of that name, or ask for one of those")
        return self.splits[name]

    def shard_paths(self, name: str) -> list[Path | str]:
        return [storage.join(self.folder, entry.file) for entry in self.split_info(name).shards]

    @property
    def fold_count(self) -> int:
        """K of `diffmic shard --folds K`; 0 when the train split has no folds."""
        return int(self.split.get("folds") or 0)

    def has_split(self, name: str, fold: int = -1) -> bool:
        return name in self.splits or (name == "val" and fold >= 0 and self.fold_count > 0)

    def selection(self, name: str, fold: int = -1) -> Selection:
        """What a stream of split `name` reads. `fold` >= 0 (data.fold) turns "train" into the train split
        without that fold and "val" into that fold of the train split; other splits are unchanged."""
        if fold < 0 or name not in ("train", "val"):
            info = self.split_info(name)
            return Selection(name, info.shards, [entry.count for entry in info.shards], info.keys)
        if not self.fold_count:
            raise ManifestError(f"{self.path} has no folds, so data.fold={fold} cannot select one: re-shard with "
                                f"`diffmic shard ... --folds K --overwrite`, or drop data.fold")
        if not 0 <= fold < self.fold_count:
            raise ManifestError(f"data.fold={fold}, but {self.path} has folds 0..{self.fold_count - 1}")
        train = self.split_info("train")
        chosen = [(key, (of == fold) == (name == "val")) for key, of in zip(train.keys, train.folds)]
        counts, start = [], 0
        for entry in train.shards:  # keys are in shard order: each shard's keys are the next entry.count
            counts.append(sum(selected for _, selected in chosen[start:start + entry.count]))
            start += entry.count
        keys = [key for key, selected in chosen if selected]
        what = f"fold {fold} of train" if name == "val" else f"train without fold {fold}"
        return Selection(what, train.shards, counts, keys, frozenset(keys))

    def to_json(self) -> str:
        values = asdict(self)
        del values["path"], values["digest"]
        for info in values["splits"].values():
            if info["folds"] is None:  # only a folded train split carries them
                del info["folds"]
        return json.dumps({"format": MANIFEST_FORMAT, **values}, indent=1) + "\n"


def write_manifest(manifest: Manifest, folder: Path) -> Path:
    path = folder / MANIFEST_NAME
    path.write_text(manifest.to_json())
    return path


def _reshard_hint(folder: Path | str, exists: bool = True) -> str:
    return f"run `diffmic shard --dataset <layout> --out {folder}{' --overwrite' if exists else ''}` to " \
           f"{'re-create' if exists else 'create'} it"


def verify_hint(folder: Path | str) -> str:
    return (f"run `diffmic verify {folder}` for a full check, and re-create the shards with "
            f"`diffmic shard ... --out {folder} --overwrite`")


def read_manifest(shard_dir: str | Path, retries: int = 0) -> Manifest:
    """Reads and checks `shard_dir/manifest.json` (or the manifest file itself), in a local folder or at a URL.
    `retries`: how often a remote read that lost its connection is tried again (the streams, mid-run)."""
    path = storage.as_location(shard_dir)
    if storage.basename(path) != MANIFEST_NAME:
        path = storage.join(path, MANIFEST_NAME)
    folder = storage.parent(path)
    raw = _remote_manifest_bytes(path, retries) if storage.is_url(path) else _local_manifest_bytes(path)
    try:
        values = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"{path} is not valid JSON ({error}): {_reshard_hint(folder)}") from None
    try:
        manifest = _manifest_from_dict(values)
    except (KeyError, TypeError, ValueError) as error:
        raise ManifestError(f"{path} is damaged ({error}): {_reshard_hint(folder)}") from None
    manifest.path, manifest.digest = path, hashlib.sha256(raw).hexdigest()
    return manifest


def _unfinished(path: Path | str) -> ManifestError:
    return ManifestError(f"{path} is missing, so {storage.parent(path)} is not a finished `diffmic shard` output "
                         f"(an interrupted run leaves none): {_reshard_hint(storage.parent(path))}")


def _local_manifest_bytes(path: Path) -> bytes:
    folder = path.parent
    if not folder.is_dir():
        raise ManifestError(f"shard folder {folder} does not exist: {_reshard_hint(folder, exists=False)}")
    if not path.is_file():
        raise _unfinished(path)
    return path.read_bytes()


def _remote_manifest_bytes(url: str, retries: int) -> bytes:
    """The manifest's bytes; a missing one is told apart from a missing folder and a missing bucket."""
    try:
        return storage.read_bytes(url, retries)
    except FileNotFoundError:
        pass
    folder = storage.parent(url)
    if storage.list_sizes(folder):
        raise _unfinished(url)
    if storage.bucket_missing(url):
        bucket = storage.bucket_of(url)
        raise StorageError(f"{folder}: the bucket {bucket!r} does not exist at this endpoint: create it, or fix the "
                           f"URL (and the endpoint: {storage.ENDPOINT_HINTS.get(storage.scheme(url), 'check it')})")
    raise ManifestError(f"shard folder {folder} does not exist: {_reshard_hint(folder, exists=False)}")


def _typed(values: dict, key: str, kind: type | tuple[type, ...]):
    if key not in values:
        raise KeyError(f"field '{key}' is missing")
    value = values[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise TypeError(f"field '{key}' has the wrong type ({type(value).__name__})")
    return value


def _manifest_from_dict(values) -> Manifest:
    if not isinstance(values, dict):
        raise TypeError("the top level is not an object")
    if values.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"format {values.get('format')!r} is not {MANIFEST_FORMAT}, the one this diffmic reads")
    classes = _typed(values, "classes", list)
    if len(classes) < 2 or not all(isinstance(name, str) for name in classes):
        raise ValueError("'classes' must list at least two class names")
    splits = {name: _split_from_dict(name, info, classes)
              for name, info in _typed(values, "splits", dict).items()}
    return Manifest(dataset=_typed(values, "dataset", str), source=_typed(values, "source", str),
                    classes=classes, image_size=_typed(values, "image_size", int),
                    image_format=_typed(values, "image_format", str),
                    preprocessing=_typed(values, "preprocessing", dict), split=_typed(values, "split", dict),
                    splits=splits, rejected=_typed(values, "rejected", int), tool=_typed(values, "tool", str),
                    source_root=_typed(values, "source_root", str))


def _split_from_dict(name: str, values, classes: list[str]) -> SplitInfo:
    if not isinstance(values, dict):
        raise TypeError(f"split '{name}' is not an object")
    shards = [ShardEntry(file=_typed(entry, "file", str), count=_typed(entry, "count", int),
                         sha256=_typed(entry, "sha256", str), bytes=_typed(entry, "bytes", int))
              for entry in _typed(values, "shards", list)]
    folds = values.get("folds")
    info = SplitInfo(count=_typed(values, "count", int), class_counts=_typed(values, "class_counts", dict),
                     shards=shards, keys=_typed(values, "keys", list),
                     folds=None if folds is None else _typed(values, "folds", list))
    if info.folds is not None and (len(info.folds) != len(info.keys)
                                   or not all(isinstance(f, int) and f >= 0 for f in info.folds)):
        raise ValueError(f"split '{name}': 'folds' must give one fold number per key")
    if list(info.class_counts) != classes:
        raise ValueError(f"split '{name}': class_counts does not list the classes in order")
    totals = {"shard counts": sum(entry.count for entry in shards), "keys": len(info.keys),
              "class counts": sum(info.class_counts.values())}
    for what, total in totals.items():
        if total != info.count:
            raise ValueError(f"split '{name}': {what} add up to {total}, not its count {info.count}")
    return info


def steps_per_epoch(manifest: Manifest, batch_size: int, world_size: int, fold: int = -1) -> int:
    """Training batches per rank and epoch: one pass over the training samples' worth (the train split,
    less fold `fold` when cross-validating) across all ranks, the same on every rank (the stream
    resamples, so it never runs dry)."""
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be positive, got {batch_size} and {world_size}")
    return max(1, manifest.selection("train", fold).count // (batch_size * world_size))
