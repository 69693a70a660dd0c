"""Where shards live: a local folder, or a URL that fsspec understands (`s3://`, `gs://`, `https://`, ...).
Locations stay strings when they are URLs (a Path would fold `s3://b` into `s3:/b`).

A shard is checked against its manifest entry (size and sha256) before any of its samples is used
(shardio.open_shard is the one function that opens a shard for the streams):
- a local file is hashed once per process before the streams start (verify.check_shard_files), then a stat
  tells whether it changed;
- a remote object is hashed while it streams in, into memory or into the local cache (`data.cache_dir`),
  and only a copy that matched is read, so nothing is downloaded twice to check it. Before the streams
  start, one listing of the folder checks that every object is there with its size.
A fetch that fails for want of a connection is tried again with doubling waits; one that still fails stops
the run with one line (a resume then continues exactly from the last checkpoint).

Credentials, endpoint and region come from the storage library's own places: for S3 that is botocore's
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from ..errors import UserError
from ..fileio import file_sha256

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
BLOCK = 8 << 20  # bytes per read of a remote object: a whole shard of 224 px JPEGs in one or two requests
MAX_WAIT_S = 30.0  # the longest pause between two tries of a fetch
# How the user fixes a refused request, by URL scheme: where that scheme's library looks for credentials.
CREDENTIAL_HINTS = {
    "s3": "check the credentials the S3 client finds (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
          "~/.aws/credentials) and that they may read and write this bucket",
    "gs": "check the credentials the Google Cloud client finds (GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth "
          "application-default login`) and that they may use this bucket",
}
BUCKET_SCHEMES = {"s3", "s3a", "gs", "gcs", "az", "abfs"}  # object stores whose URLs start with a bucket
ENDPOINT_HINTS = {"s3": "check AWS_ENDPOINT_URL (or endpoint_url in ~/.aws/config) and that the server is up"}


class StorageError(UserError, ValueError):
    """A shard folder's storage cannot be reached or refuses the request: one line naming the URL and the fix."""


class ChecksumMismatch(ValueError):
    """A shard's bytes differ from its manifest entry (the message says how)."""


# --- locations --------------------------------------------------------------------------------------
def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and bool(_URL.match(location))


def as_location(value: str | Path) -> str | Path:
    """A shard folder as given: a URL stays the string it is (Path would fold `s3://b` into `s3:/b`),
    anything else is a local path."""
    return value.rstrip("/") if is_url(value) else Path(value)


def absolute_location(value: str | Path | None) -> str | None:
    """What a launched process is told: a URL as it is, a local path made absolute."""
    if value is None or value == "":
        return None
    return str(as_location(value)) if is_url(value) else str(Path(value).resolve())


def join(folder: str | Path, name: str) -> str | Path:
    return f"{folder.rstrip('/')}/{name}" if is_url(folder) else Path(folder) / name


def basename(location: str | Path) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1] if is_url(location) else Path(location).name


def parent(location: str | Path) -> str | Path:
    return location.rstrip("/").rsplit("/", 1)[0] if is_url(location) else Path(location).parent


# Every filesystem instance this process opened, held for good (fsspec caches them anyway). A forked child (a
# DataLoader worker) inherits these references, so the instances it inherits are never closed there: closing
# them in the child takes their sockets out of the epoll set it shares with the parent, whose next request on
# those connections then waits for its timeout (benchmarks/data.py --s3 measured 16 s per loader before this).
_OPENED: dict[int, object] = {}


# botocore reads the S3 service description and the endpoint rules (megabytes of JSON) into each session it makes,
# which costs a new S3 client 0.1-0.4 s of CPU. A DataLoader worker is a new process every epoch and makes its own
# client, so a session made after a fork takes the data files its parent already read (they are read-only); its
# credentials and connections stay its own. benchmarks/data.py --s3 measured the time to an epoch's first batch.
_S3_SESSION: tuple[int, object] | None = None  # (the pid that made it, its AioSession)
_BOTOCORE_DATA = None  # the first session's data loader, shared by every session made after it


def _s3_session():
    """This process's botocore session for S3, made once per process."""
    global _S3_SESSION, _BOTOCORE_DATA
    if _S3_SESSION is None or _S3_SESSION[0] != os.getpid():
        from aiobotocore.session import AioSession

        session = AioSession()
        if _BOTOCORE_DATA is None:
            _BOTOCORE_DATA = session.get_component("data_loader")
        else:
            session.register_component("data_loader", _BOTOCORE_DATA)
        _S3_SESSION = (os.getpid(), session)
    return _S3_SESSION[1]


def filesystem(url: str):
    """The fsspec filesystem of a URL and the path it knows the object by."""
    import fsspec

    try:
        options = {"session": _s3_session()} if scheme(url) in {"s3", "s3a"} else {}
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as error:  # an unknown scheme, or its library is not installed
        raise StorageError(f"{url}: no storage library for this URL ({error}); install the fsspec "
                           f"implementation it names (s3fs for s3://, gcsfs for gs://)") from None
    _OPENED.setdefault(id(fs), fs)
    return fs, path


@dataclass(frozen=True)
class ShardFile:
    """One shard as a stream opens it: where it is and what its manifest entry says it holds."""

    location: str  # a local path or a URL
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Fetching:
    """How remote shards are read: the local cache folder ('' for none) and how many times a fetch that lost
    its connection is tried again (waiting 1, 2, 4, ... s, at most MAX_WAIT_S)."""

    cache_dir: str = ""
    retries: int = 6

    @classmethod
    def of(cls, data) -> "Fetching":
        """From a DataConfig."""
        return cls(data.cache_dir, data.fetch_retries)


# --- errors -----------------------------------------------------------------------------------------
def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors that say the connection failed, not that the request was wrong: worth another try."""
    from fsspec.exceptions import FSTimeoutError

    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError, FSTimeoutError]
    try:
        from botocore import exceptions as boto

        kinds += [boto.ConnectionError, boto.HTTPClientError, boto.IncompleteReadError]
    except ImportError:
        pass
    try:
        import aiohttp

        kinds.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(kinds)


def scheme(url: str) -> str:
    return urlsplit(url).scheme.lower()


def _no_credentials(error: BaseException) -> bool:
    return type(error).__name__ == "NoCredentialsError"


def describe_failure(url: str, error: BaseException) -> str:
    """One line for a request that failed: what happened to which URL, and what to do about it."""
    kind = scheme(url)
    said = str(error).strip() or type(error).__name__
    if isinstance(error, PermissionError) or _no_credentials(error):
        return (f"{url}: access denied ({said}): "
                f"{CREDENTIAL_HINTS.get(kind, 'check the credentials of this storage')}")
    if isinstance(error, _transient_errors()):
        return (f"{url}: cannot reach the storage ({said}): "
                f"{ENDPOINT_HINTS.get(kind, 'check the address and that the server is up')}")
    return f"{url}: the storage refused the request ({type(error).__name__}: {said})"


@contextmanager
def storage_errors(url: str, keep: tuple[type[BaseException], ...] = ()):
    """Any failure of the storage library inside becomes a StorageError of one line; a missing object stays a
    FileNotFoundError for the caller to explain, and the errors in `keep` pass as they are."""
    try:
        yield
    except (FileNotFoundError, StorageError, ChecksumMismatch, *keep):
        raise
    except Exception as error:  # noqa: BLE001 - every library failure is this URL's problem, said in one line
        raise StorageError(describe_failure(url, error)) from None


def with_retries(url: str, action: Callable[[], object], retries: int = 0):
    """`action()` (a call of the storage library), tried again after a lost connection, waiting 1, 2, 4, ... s.
    Other failures are not retried: a wrong credential or a missing object does not heal by waiting. With no
    retries (a command starting) a lost connection is said as a wrong endpoint would be."""
    transient = _transient_errors()
    waited = 0.0
    for attempt in range(retries + 1):
        try:
            with storage_errors(url, keep=transient):
                return action()
        except transient as error:
            if attempt == retries:
                raise StorageError(_gave_up(url, error, attempt + 1, waited)) from None
            pause = min(2.0 ** attempt, MAX_WAIT_S)
            warnings.warn(f"{url}: {type(error).__name__}; trying again in {pause:.0f} s ({attempt + 1} of {retries})",
                          stacklevel=2)
            time.sleep(pause)
            waited += pause
    raise AssertionError("unreachable")


def _gave_up(url: str, error: BaseException, tries: int, waited: float) -> str:
    said = describe_failure(url, error)
    if tries == 1:
        return said
    return (f"{url}: the storage did not answer after {tries} tries over {waited:.0f} s "
            f"({said.split(': ', 1)[1]}). Nothing after the last checkpoint is lost: run the same command again "
            f"once the storage is back, and it resumes from there")


# --- whole small files (the manifest), listings, uploads --------------------------------------------
def read_bytes(location: str | Path, retries: int = 0) -> bytes:
    """The bytes of a local file or of a remote object; FileNotFoundError when it is not there."""
    if not is_url(location):
        return Path(location).read_bytes()
    fs, path = filesystem(location)
    return with_retries(location, lambda: fs.cat_file(path), retries)


def upload_file(path: Path, url: str) -> None:
    """One local file to one object (an object appears whole when its upload completes)."""
    fs, remote = filesystem(url)
    with_retries(url, lambda: fs.put_file(str(path), remote))


def remove(url: str) -> None:
    fs, remote = filesystem(url)
    with_retries(url, lambda: fs.rm_file(remote))


def list_sizes(folder: str, retries: int = 0) -> dict[str, int | None]:
    """{name: bytes} of the objects directly in a remote folder (one listing request); {} when there is none.
    A size is None where the listing does not give it (a web server's index page)."""
    fs, path = filesystem(folder)
    fs.invalidate_cache(path)  # fsspec keeps listings: the folder may have changed since
    try:
        entries = with_retries(folder, lambda: fs.ls(path, detail=True), retries)
    except FileNotFoundError:
        return {}
    return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: None if entry.get("size") is None else int(entry["size"])
            for entry in entries if entry.get("type") != "directory"}


def object_size(url: str, retries: int = 0) -> int | None:
    """The size of one remote object, None when it is not there (for stores whose folders cannot be listed,
    such as a plain https server)."""
    fs, path = filesystem(url)
    try:
        return int(with_retries(url, lambda: fs.info(path), retries).get("size") or 0)
    except FileNotFoundError:
        return None


def bucket_of(url: str) -> str:
    """The bucket (or host) of a URL: the part after the scheme."""
    return urlsplit(url).netloc


def bucket_missing(url: str) -> bool:
    """Whether the bucket of a URL does not exist (False for stores without buckets, such as https)."""
    bucket = bucket_of(url)
    if not bucket or scheme(url) not in BUCKET_SCHEMES:
        return False
    fs, _ = filesystem(url)
    return not with_retries(url, lambda: fs.exists(bucket))


# --- local copies: shard folders on disk and the cache ---------------------------------------------
# Local shards whose size and sha256 matched in this process: (size, mtime, inode) then, and the sha256 matched.
_MATCHED: dict[Path, tuple[tuple[int, int, int], str]] = {}


def _stat(path: Path) -> os.stat_result | None:
    """The file's status, None when it is missing or is not a regular file."""
    return path.stat() if path.is_file() else None


def file_problems(path: Path, shard: ShardFile, stat: os.stat_result | None) -> list[str]:
    """What is wrong with one local shard file as a file (missing, size, sha256), against its manifest entry."""
    if stat is None:
        return ["missing"]
    problems = []
    if stat.st_size != shard.bytes:
        problems.append(f"{stat.st_size} bytes, the manifest says {shard.bytes}")
    if file_sha256(path) != shard.sha256:
        problems.append("sha256 differs from the manifest (the file changed or is corrupt)")
    return problems


def local_copy_matches(path: Path, shard: ShardFile) -> list[str]:
    """The problems of a local file against its entry, hashing it again only once its size, mtime or inode
    changed since it last matched in this process."""
    stat = _stat(path)
    seen = None if stat is None else (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if seen is not None and _MATCHED.get(path) == (seen, shard.sha256):
        return []
    problems = file_problems(path, shard, stat)
    if not problems:
        remember(path, shard)
    return problems


def remember(path: Path, shard: ShardFile) -> None:
    """Records that the file at `path`, as it is now, holds `shard`'s bytes."""
    stat = path.stat()
    _MATCHED[path] = ((stat.st_size, stat.st_mtime_ns, stat.st_ino), shard.sha256)


# --- opening and reading one shard ------------------------------------------------------------------
def _blocks(fs, path: str) -> Iterator[bytes]:
    """An object's bytes in blocks of at most BLOCK. Where the library streams a whole object from one request
    (fsspec's async filesystems: s3fs, gcsfs, http) it does so; its file objects would first ask for the object's
    details (a request more per shard, and a third more CPU per 3 MB shard from the CI's S3 server)."""
    if getattr(fs, "async_impl", False):
        from fsspec.asyn import sync

        try:
            handle = sync(fs.loop, fs.open_async, path, "rb")
        except NotImplementedError:
            handle = None
        if handle is not None:
            while block := sync(fs.loop, handle.read, BLOCK):
                yield block
            sync(fs.loop, handle.close)
            return
    with fs.open(path, "rb", block_size=BLOCK, cache_type="none") as handle:
        yield from iter(lambda: handle.read(BLOCK), b"")


def _stream_checked(shard: ShardFile, sink: BinaryIO) -> None:
    """Copies a remote shard into `sink`, hashing it on the way; ChecksumMismatch when it is not the manifest's."""
    fs, path = filesystem(shard.location)
    digest, size = hashlib.sha256(), 0
    for block in _blocks(fs, path):
        digest.update(block)
        size += len(block)
        sink.write(block)
    if size != shard.bytes:
        raise ChecksumMismatch(f"{size} bytes arrived, the manifest says {shard.bytes}")
    if digest.hexdigest() != shard.sha256:
        raise ChecksumMismatch("sha256 differs from the manifest (the object changed after the manifest was "
                               "written, or is corrupt)")


def _fetch_into(shard: ShardFile, make_sink: Callable[[], BinaryIO], fetching: Fetching) -> BinaryIO:
    """A new sink (one per try, so a broken transfer leaves nothing behind) holding the checked shard; raises
    FileNotFoundError, ChecksumMismatch or StorageError."""

    def attempt() -> BinaryIO:
        sink = make_sink()
        try:
            _stream_checked(shard, sink)
            return sink
        except BaseException:
            sink.close()
            raise

    return with_retries(shard.location, attempt, fetching.retries)


def cache_path(url: str, cache_dir: str) -> Path:
    """Where a remote shard is kept on this machine: CACHE/<scheme>/<bucket or host>/<path>."""
    parts = urlsplit(url)
    return Path(cache_dir) / parts.scheme / parts.netloc / parts.path.lstrip("/")


def cached_copy(shard: ShardFile, cache_dir: str, fetching: Fetching) -> Path:
    """The local copy of a remote shard, fetched (and checked) only when it is missing or no longer matches
    the manifest. Several processes may fetch the same shard at once: each writes its own temporary file and
    renames it into place, and the copies are identical."""
    path = cache_path(shard.location, cache_dir)
    if not local_copy_matches(path, shard):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.part-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with _fetch_into(shard, lambda: open(temporary, "wb"), fetching) as written:
            written.flush()
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    remember(path, shard)  # checked as it arrived: the next use costs a stat
    return path


def fetch_shard(shard: ShardFile, fetching: Fetching) -> BinaryIO:
    """A remote shard, checked, as a handle positioned at its start: its cached copy (fetched first when
    missing or stale), or its bytes in memory without a cache."""
    if fetching.cache_dir:
        return open(cached_copy(shard, fetching.cache_dir, fetching), "rb", buffering=1 << 20)
    fetched = _fetch_into(shard, io.BytesIO, fetching)
    fetched.seek(0)
    return fetched
