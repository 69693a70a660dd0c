"""`diffmic verify`: re-reads a shard folder (local or at a URL) against its manifest and names every problem
found; and the quick check that every process reading shards runs first (`check_shard_files`).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from . import storage
from .manifest import CorruptShardError, Manifest, ShardEntry, read_manifest, verify_hint
from .shardio import iter_samples
from .storage import Fetching, ShardFile

EXPECTED_MEMBERS = ("cls", "json")


def check_shard_files(manifest: Manifest, entries: list[ShardEntry],
                      fetching: Fetching = Fetching(retries=0)) -> None:
    """Raises CorruptShardError for the first shard of `entries` whose file or object does not match the
    manifest, before the streams read any. Local: size and sha256 (the first check reads every byte once:
    `python benchmarks/data.py` measures 0.011 s for 8.8 MB of HAM10000-like shards on 2 cores, 0.8% of one
    epoch of the training stream; later loaders cost a stat per shard). Remote: see `_check_remote`."""
    if storage.is_url(manifest.folder):
        _check_remote(manifest, entries, fetching)
        return
    for entry in entries:
        shard = manifest.shard_file(entry)
        problems = storage.local_copy_matches(Path(shard.location), shard)
        if problems:
            raise CorruptShardError(f"{shard.location}: {problems[0]}; {verify_hint(manifest.folder)}")


def _check_remote(manifest: Manifest, entries: list[ShardEntry], fetching: Fetching) -> None:
    """One listing checks that every object is there with its size; its sha256 is checked as it streams in
    (shardio.open_shard). Copies already in the cache are hashed here, once per process, so that the loader
    workers (forked from here) know them and a later epoch costs a stat per shard, as for a local folder."""
    sizes = storage.list_sizes(manifest.folder, fetching.retries)
    for entry in entries:
        shard = manifest.shard_file(entry)
        size = sizes.get(entry.file)
        if size is None:  # not listed, or listed without its size: ask for the object itself
            size = storage.object_size(shard.location, fetching.retries)
        if size != entry.bytes:
            problem = "missing" if size is None else f"{size} bytes, the manifest says {entry.bytes}"
            raise CorruptShardError(f"{shard.location}: {problem}; {verify_hint(manifest.folder)}")
        if fetching.cache_dir:  # a stale copy is fetched again when it is read
            storage.local_copy_matches(storage.cache_path(shard.location, fetching.cache_dir), shard)


def verify_shards(shard_dir: str | Path, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Problems found (empty when all is well): checksums, sizes, sample counts, keys, labels, class
    counts, and that every image decodes at the manifest's size. A missing or damaged manifest raises
    ManifestError instead, as everywhere."""
    manifest = read_manifest(shard_dir)
    problems: list[str] = []
    listed = {entry.file for info in manifest.splits.values() for entry in info.shards}
    for stray in sorted(name for name in _tar_names(manifest.folder) if name not in listed):
        problems.append(f"{stray}: a shard the manifest does not list (left from another run?)")
    done, total = 0, sum(info.count for info in manifest.splits.values())
    for name, info in manifest.splits.items():
        keys: list[str] = []
        labels: Counter = Counter()
        for entry in info.shards:
            found = _verify_shard(manifest, entry, problems)
            keys += [key for key, _ in found]
            labels.update(label for _, label in found if label is not None)
            done += entry.count
            if progress is not None:
                progress(done, total)
        if keys != info.keys:
            missing, extra = set(info.keys) - set(keys), set(keys) - set(info.keys)
            problems.append(f"split {name}: the shards' keys differ from the manifest's ({len(missing)} missing, "
                            f"{len(extra)} unexpected, or a different order)")
        counted = {cls: labels[index] for index, cls in enumerate(manifest.classes)}
        if keys == info.keys and counted != info.class_counts:
            problems.append(f"split {name}: class counts {counted} differ from the manifest's {info.class_counts}")
    return problems


def _tar_names(folder: Path | str) -> list[str]:
    if storage.is_url(folder):
        return [name for name in storage.list_sizes(folder) if name.endswith(".tar")]
    return [path.name for path in Path(folder).glob("*.tar")]


def _verify_shard(manifest: Manifest, entry: ShardEntry, problems: list[str]) -> list[tuple[str, int | None]]:
    """(key, label) of each sample read from one shard; its problems are appended to `problems`. A remote shard
    is fetched once: its checksum is computed on the way in, and the samples are read from those bytes."""
    shard = manifest.shard_file(entry)
    handle = _open_for_verify(shard, entry, problems)
    if handle is None:
        return []
    found: list[tuple[str, int | None]] = []
    try:
        with handle:
            for sample in iter_samples(handle, entry.file):
                found.append((sample["__key__"], _check_sample(manifest, entry.file, sample, problems)))
    except ValueError as error:
        problems.append(f"{entry.file}: unreadable after {len(found)} samples ({error})")
    if len(found) != entry.count:
        problems.append(f"{entry.file}: {len(found)} samples, the manifest says {entry.count}")
    return found


def _open_for_verify(shard: ShardFile, entry: ShardEntry, problems: list[str]) -> BinaryIO | None:
    """The shard's bytes to read samples from, its file problems appended; None when there is nothing to read."""
    if not storage.is_url(shard.location):
        path = Path(shard.location)
        stat = path.stat() if path.is_file() else None
        problems += [f"{entry.file}: {problem}" for problem in storage.file_problems(path, shard, stat)]
        return None if stat is None else open(path, "rb", buffering=1 << 20)
    try:
        data = storage.read_bytes(shard.location)
    except FileNotFoundError:
        problems.append(f"{entry.file}: missing")
        return None
    if len(data) != entry.bytes:
        problems.append(f"{entry.file}: {len(data)} bytes, the manifest says {entry.bytes}")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        problems.append(f"{entry.file}: sha256 differs from the manifest (the object changed or is corrupt)")
    return io.BytesIO(data)


def _check_sample(manifest: Manifest, shard: str, sample: dict, problems: list[str]) -> int | None:
    where = f"{shard}: sample {sample['__key__']}"
    missing = [member for member in (manifest.image_format, *EXPECTED_MEMBERS) if member not in sample]
    if missing:
        problems.append(f"{where}: no {', '.join(missing)} member")
        return None
    try:
        label = int(sample["cls"])
        json.loads(sample["json"])
    except ValueError as error:
        problems.append(f"{where}: unreadable cls or json ({error})")
        return None
    if not 0 <= label < len(manifest.classes):
        problems.append(f"{where}: label {label} outside 0..{len(manifest.classes) - 1}")
    _check_image(manifest, where, sample[manifest.image_format], problems)
    return label


def _check_image(manifest: Manifest, where: str, data: bytes, problems: list[str]) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            size = image.size
    except Exception as error:  # noqa: BLE001 - any decoding failure is this image's problem
        problems.append(f"{where}: the image does not decode ({type(error).__name__}: {error})")
        return
    if size != (manifest.image_size, manifest.image_size):
        problems.append(f"{where}: image is {size[0]}x{size[1]}, the manifest says {manifest.image_size}px")
