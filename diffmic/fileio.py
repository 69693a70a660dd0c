"""Atomic file writes (and a file's sha256): the one helper every module uses, so a crash or a full disk never leaves a
half-written file under the final name (readers see the old file or the new one, nothing between).

The bookkeeping files diffmic writes and reads back (run.json, metrics.jsonl rows, sweep.json, a checkpoint's
record, ...) are *sealed*: they carry the sha256 of their own content under `checksum`, so that a changed byte that
still parses (a digit of a step, a letter of a status) is refused by name instead of being believed. A file
without a checksum was written before seals existed and is read as it is. Appends refuse symbolic links, so a
link planted in a run folder never makes diffmic write outside it.

Imports nothing heavy: the CLI, the data tools and the engine all use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import RunFileError

CHECKSUM_KEY = "checksum"  # the seal of a JSON object: the sha256 of the rest of it
TEXT_SEAL = "# checksum: sha256 "  # the seal of a text file (config.yaml): its last line


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path` (same folder, so `os.replace` is a rename on one file system), unique per
    writer so concurrent writers never share it. Not mkstemp: its 0600 mode would stick to the file."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Calls `write(temporary)` to fill a temporary file, then renames it to `path`; on any failure the
    temporary is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename == str(temporary):
            error.filename = str(path)  # the user knows the file, not its temporary name
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda temporary: temporary.write_text(text))


def write_json_atomic(path: str | os.PathLike, values: Any, **dump_options: Any) -> Path:
    dump_options.setdefault("indent", 2)
    return write_text_atomic(path, json.dumps(values, **dump_options))


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in blocks (shards and checkpoints are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- sealed JSON and text -------------------------------------------------------------------------------
def content_digest(values: dict) -> str:
    """sha256 of a JSON object in one canonical form (sorted keys, no spaces), whatever its indentation on disk."""
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def sealed(values: dict) -> dict:
    """`values` with their checksum (last, so a reader sees the content first)."""
    content = {key: value for key, value in values.items() if key != CHECKSUM_KEY}
    return {**content, CHECKSUM_KEY: content_digest(content)}


def unsealed(values: dict, where: str, fix: str) -> dict:
    """`values` without their checksum, once it matches; RunFileError naming `where` when it does not."""
    if CHECKSUM_KEY not in values:
        return values  # written before seals existed
    content = {key: value for key, value in values.items() if key != CHECKSUM_KEY}
    if values[CHECKSUM_KEY] != content_digest(content):
        raise RunFileError(f"{where} was changed after diffmic wrote it (its checksum does not match its content); "
                           f"{fix}")
    return content


def write_sealed_json(path: str | os.PathLike, values: dict) -> Path:
    return write_json_atomic(path, sealed(values))


def read_json_object(path: str | os.PathLike, fix: str) -> dict:
    """A JSON object from a file that must be UTF-8 and parse; RunFileError naming it otherwise (FileNotFoundError
    when it is missing, for the caller to decide)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        values = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise RunFileError(f"{path} is damaged (it is not UTF-8 text); {fix}") from None
    except json.JSONDecodeError as error:
        raise RunFileError(f"{path} is damaged (it is not valid JSON: {error.msg} at line {error.lineno}); "
                           f"{fix}") from None
    if not isinstance(values, dict):
        raise RunFileError(f"{path} is damaged (it holds a JSON {type(values).__name__}, not an object); {fix}")
    return values


def read_sealed_json(path: str | os.PathLike, fix: str) -> dict:
    """A sealed JSON object (or one written before seals); RunFileError naming the file when it is damaged."""
    return unsealed(read_json_object(path, fix), str(path), fix)


def sealed_line(values: dict) -> str:
    """One sealed JSON object on one line, for append-only logs (metrics.jsonl)."""
    return json.dumps(sealed(values)) + "\n"


def sealed_text(text: str) -> str:
    """A text file (config.yaml) with its checksum as a last comment line."""
    text = text if text.endswith("\n") else text + "\n"
    return f"{text}{TEXT_SEAL}{hashlib.sha256(text.encode()).hexdigest()}\n"


def read_sealed_text(path: str | os.PathLike, fix: str) -> str:
    """The text of a file written by `sealed_text` (or before seals), without its seal; RunFileError naming it
    when it is not UTF-8 or its checksum does not match."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise RunFileError(f"{path} is damaged (it is not UTF-8 text); {fix}") from None
    body, _, last = text.rstrip("\n").rpartition("\n")
    if not last.startswith(TEXT_SEAL):
        return text
    body += "\n"
    if last.removeprefix(TEXT_SEAL) != hashlib.sha256(body.encode()).hexdigest():
        raise RunFileError(f"{path} was changed after diffmic wrote it (its checksum does not match its content); "
                           f"{fix}")
    return body


# --- writing inside a folder ----------------------------------------------------------------------------
def open_for_append(path: str | os.PathLike):
    """A file opened for appending (created if missing), refusing a symbolic link: a link planted in a run folder
    must not make diffmic write to the file it points to, outside the folder."""
    path = Path(path)
    try:
        handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError:
        if path.is_symlink():
            raise RunFileError(f"{path} is a symbolic link (to {os.readlink(path)}); diffmic appends only to files "
                               f"inside the folder: replace the link by a copy of the file "
                               f"(cp --remove-destination \"$(readlink -f {path})\" {path})") from None
        raise
    return os.fdopen(handle, "a")


def append_text(path: str | os.PathLike, text: str) -> None:
    with open_for_append(path) as stream:
        stream.write(text)


def check_writable(folder: str | os.PathLike, fix: str) -> Path:
    """Creates `folder` if needed and proves a file can be written in it, before any long work whose result would
    land there; RunFileError naming the folder otherwise."""
    folder = Path(folder)
    probe = folder / temporary_name(folder / "write-check").name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as error:
        raise RunFileError(f"cannot write in {folder} ({error.strerror or error}); {fix}") from None
    return folder
