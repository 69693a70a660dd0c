"""Atomic file writes (and a file's sha256): the one helper every module uses, so a crash or a full disk never leaves a
half-written file under the final name (readers see the old file or the new one, nothing between).

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
    except BaseException:
        temporary.unlink(missing_ok=True)
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
