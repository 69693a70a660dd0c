"""WebDataset tar shards, written byte-for-byte reproducibly and read as a stream.

The format is WebDataset's (members `<key>.<ext>` grouped by key, `cls` as ASCII digits), so any
WebDataset reader opens these shards. We write the tars with `tarfile` ourselves: fixed mtime, owner and
mode make the same inputs give the same sha256, and the readers avoid importing webdataset (and torch)
in processes that only need bytes.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

from .manifest import ShardEntry

SHARD_PATTERN = "{split}-{index:06d}.tar"
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


def safe_key(text: str) -> str:
    """A sample key WebDataset splits correctly: it cuts the extension at the first dot of a member
    name, and a slash would make a folder, so both (and anything unusual) become underscores."""
    return _UNSAFE_KEY_CHARS.sub("_", text.replace("/", "__").replace("\\", "__"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SplitShardWriter:
    """Writes one split's samples into `<split>-000000.tar`, ... with at most `shard_size` each."""

    def __init__(self, folder: Path, split: str, shard_size: int):
        self.folder, self.split, self.shard_size = folder, split, shard_size
        self.entries: list[ShardEntry] = []
        self._tar: tarfile.TarFile | None = None
        self._path: Path | None = None
        self._count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if self._tar is None or self._count == self.shard_size:
            self._close_shard()
            self._open_shard()
        for extension in sorted(members):
            data = members[extension]
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = "diffmic"
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def finish(self) -> list[ShardEntry]:
        self._close_shard()
        return self.entries

    def _open_shard(self) -> None:
        self._path = self.folder / SHARD_PATTERN.format(split=self.split, index=len(self.entries))
        self._tar = tarfile.open(self._path, "w", format=tarfile.PAX_FORMAT)
        self._count = 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self.entries.append(ShardEntry(file=self._path.name, count=self._count, sha256=file_sha256(self._path),
                                       bytes=self._path.stat().st_size))
        self._tar = None


def split_member_name(name: str) -> tuple[str, str]:
    """`ISIC_0024306.jpg` -> (`ISIC_0024306`, `jpg`), cutting at the first dot as WebDataset does."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        raise ValueError(f"member {name!r} is not named <key>.<extension>")
    return (f"{folder}/{stem}" if folder else stem), extension


def iter_shard_samples(path: Path) -> Iterator[dict[str, bytes | str]]:
    """Yields each sample as {'__key__': key, extension: bytes, ...}. Raises ValueError naming the
    shard when it is not a readable tar of consecutive <key>.<ext> members."""
    sample: dict = {}
    seen: set[str] = set()
    try:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = split_member_name(member.name)
                if sample and key != sample["__key__"]:
                    yield sample
                    sample = {}
                if not sample:
                    if key in seen:
                        raise ValueError(f"key {key!r} appears twice")
                    seen.add(key)
                    sample = {"__key__": key}
                sample[extension] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable tar shard ({error})") from None
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    if sample:
        yield sample
