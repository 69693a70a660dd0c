"""WebDataset tar shards, written byte-for-byte reproducibly and read as a stream (`read_shard`, from a local
folder or a URL).

The format is WebDataset's (members `<key>.<ext>` grouped by key, `cls` as ASCII digits), so any
WebDataset reader opens these shards. We write the tars with `tarfile` ourselves: fixed mtime, owner and
mode make the same inputs give the same sha256, and the readers avoid importing webdataset (and torch)
in processes that only need bytes.
"""

from __future__ import annotations

import io
import re
import tarfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from ..fileio import file_sha256
from .manifest import CorruptShardError, ShardEntry, verify_hint
from .storage import Fetching, ShardFile, StorageError, fetch_shard, is_url, parent

SHARD_PATTERN = "{split}-{index:06d}.tar"
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


def safe_key(text: str) -> str:
    """A sample key WebDataset splits correctly: it cuts the extension at the first dot of a member
    name, and a slash would make a folder, so both (and anything unusual) become underscores."""
    return _UNSAFE_KEY_CHARS.sub("_", text.replace("/", "__").replace("\\", "__"))


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


def _octal(field: bytes) -> int:
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a PAX extended header ("<length> path=<name>\n" records)."""
    for record in data.decode("utf-8").splitlines():
        _, _, assignment = record.partition(" ")
        key, _, value = assignment.partition("=")
        if key == "path":
            return value
    return None


def iter_tar_files(handle: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each regular file in an uncompressed tar stream. A small reader of its own:
    `tarfile` spends most of the training stream's time parsing headers, and the shuffle buffer reads
    every sample of a shard. Checks each header's checksum, so corruption cannot pass as a name."""
    long_name = None
    while True:
        header = handle.read(512)
        if not header:
            raise ValueError("the file ends before the tar's end-of-archive blocks (it was cut short)")
        if not header.strip(b"\0"):
            return  # end-of-archive blocks
        if len(header) < 512:
            raise ValueError("the file ends inside a tar header")
        if _octal(header[148:156]) != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise ValueError("a tar header fails its checksum")
        size, kind = _octal(header[124:136]), header[156:157]
        content = handle.read(size)
        if len(content) < size:
            raise ValueError("the file ends inside a member")
        handle.read(-size % 512)
        if kind == b"x":
            long_name = _pax_path(content)
        elif kind in (b"0", b"\0"):
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8") if header[257:262] == b"ustar" else ""
            yield long_name or (f"{prefix}/{name}" if prefix else name), content
            long_name = None
        elif kind != b"g":  # folders, links and global headers carry no sample data
            long_name = None


def iter_shard_samples(path: Path) -> Iterator[dict[str, bytes | str]]:
    """The samples of a local shard file (see `iter_samples`)."""
    try:
        with open(path, "rb", buffering=1 << 20) as handle:
            yield from iter_samples(handle, str(path))
    except OSError as error:
        raise ValueError(f"{path} is not a readable tar shard ({error})") from None


def iter_samples(handle: BinaryIO, name: str) -> Iterator[dict[str, bytes | str]]:
    """Yields each sample of a tar stream as {'__key__': key, extension: bytes, ...}. Raises ValueError naming
    the shard (`name`) when it is not a readable tar of consecutive <key>.<ext> members."""
    sample: dict = {}
    seen: set[str] = set()
    try:
        for member, content in iter_tar_files(handle):
            key, extension = split_member_name(member)
            if sample and key != sample["__key__"]:
                yield sample
                sample = {}
            if not sample:
                if key in seen:
                    raise ValueError(f"key {key!r} appears twice")
                seen.add(key)
                sample = {"__key__": key}
            sample[extension] = content
    except UnicodeDecodeError as error:
        raise ValueError(f"{name} is not a readable tar shard ({error})") from None
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    if sample:
        yield sample


def open_shard(shard: ShardFile, fetching: Fetching = Fetching()) -> BinaryIO:
    """The one way the streams open a shard, checked against its manifest entry: a local file (hashed before the
    streams start, `verify.check_shard_files`), or a remote object hashed as it streams in (storage.py)."""
    if is_url(shard.location):
        return fetch_shard(shard, fetching)
    return open(shard.location, "rb", buffering=1 << 20)


def read_shard(shard: ShardFile, fetching: Fetching = Fetching()) -> Iterator[dict]:
    """The samples of one shard for the training and eval streams. A shard that is missing, differs from the
    manifest or does not read as a tar (truncated, damaged header) is a CorruptShardError of one line; a storage
    that cannot be reached is a StorageError of one line."""
    return _samples(shard, lambda: open_shard(shard, fetching))


def _samples(shard: ShardFile, opener: Callable[[], BinaryIO]) -> Iterator[dict]:
    hint = verify_hint(parent(shard.location))
    try:
        with opener() as handle:
            yield from iter_samples(handle, shard.location)
    except StorageError:
        raise
    except FileNotFoundError:
        raise CorruptShardError(f"{shard.location}: missing; {hint}") from None
    except OSError as error:
        raise CorruptShardError(f"{shard.location} is not a readable tar shard ({error}); {hint}") from None
    except ValueError as error:  # ChecksumMismatch, or a damaged tar (its message names the shard)
        said = str(error) if str(error).startswith(shard.location) else f"{shard.location}: {error}"
        raise CorruptShardError(f"{said}; {hint}") from None


class ShardReader:
    """Reads the shards of one stream in turn. With `ahead` > 0, `prefetch(shards)` starts fetching (in threads) the
    remote shards the stream will read next, up to `ahead` of them, so that their downloads overlap the work on the
    current one (each loader worker otherwise waits for every shard it draws). A shard is still checked in full
    before any of its samples is used, and a wrong guess costs only its download."""

    def __init__(self, fetching: Fetching, ahead: int):
        self.fetching, self.ahead = fetching, ahead
        self._pending: deque[_Fetch] = deque()  # fetches started, in the order the stream will read them

    def fetches_ahead(self, shard: ShardFile) -> bool:
        return self.ahead > 0 and is_url(shard.location)

    def prefetch(self, upcoming: list[ShardFile]) -> None:
        """The shards read after the current one, in order: those not yet in flight start fetching."""
        upcoming = upcoming[:self.ahead]
        if [fetch.shard for fetch in self._pending] != upcoming[:len(self._pending)]:
            self._pending.clear()  # the stream's course changed: drop the guesses
        for shard in upcoming[len(self._pending):]:
            self._pending.append(_Fetch(shard, self.fetching))

    def read(self, shard: ShardFile) -> Iterator[dict]:
        """The samples of `shard`, from its fetch ahead when that was for it; claimed now, read lazily."""
        fetched = self._pending.popleft() if self._pending else None
        if fetched is not None and fetched.shard == shard:
            return _samples(shard, fetched.result)
        self._pending.clear()
        return read_shard(shard, self.fetching)


class _Fetch:
    """open_shard in a daemon thread: a loader worker leaves by os._exit, so nothing waits for a guess in flight."""

    def __init__(self, shard: ShardFile, fetching: Fetching):
        self.shard = shard
        self._done = threading.Event()
        self._handle: BinaryIO | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, args=(fetching,), daemon=True, name="diffmic-fetch-ahead").start()

    def _run(self, fetching: Fetching) -> None:
        try:
            self._handle = open_shard(self.shard, fetching)
        except BaseException as error:  # noqa: BLE001 - raised where the shard is read, as a direct fetch would
            self._error = error
        finally:
            self._done.set()

    def result(self) -> BinaryIO:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._handle
