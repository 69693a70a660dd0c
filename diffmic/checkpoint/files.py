"""The kinds of file a checkpoint is made of, and the only ways diffmic reads them.

Tensors are safetensors (a header and raw bytes: nothing in it can run), everything else is JSON. The one
exception is DeepSpeed's own engine files, which DeepSpeed writes with `torch.save`: they are read through
`torch.load(weights_only=True)` with an allowlist of three plain DeepSpeed value types. A file that does not
parse as its kind is refused with one line naming it, before anything in it is used.

Every writer here returns what it wrote (`Written`: the size and the sha256), hashed from the bytes on their way
to the disk, never by reading the file again: the checkpoint's record keeps them, and readers compare.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import random
import re
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, DiskFullError
from ..fileio import file_sha256, write_atomic

# Written under this key of a safetensors header: the non-tensor part of what the file holds.
METADATA_KEY = "diffmic"
# The value types inside DeepSpeed's optimizer files (a loss-scaler record, a fragment address, the ZeRO
# stage enum); each is rebuilt from plain values, none runs code of the file's choosing.
DEEPSPEED_VALUE_TYPES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                         "deepspeed.utils.tensor_fragment.fragment_address",
                         "deepspeed.runtime.zero.config.ZeroStageEnum")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# safetensors' names of the tensor types a checkpoint holds.
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass(frozen=True)
class Written:
    """A file as it was written: its size and the sha256 of its bytes."""

    size: int
    sha256: str


class HashingFile:
    """A binary file that hashes every byte written through it (torch.save and our writers take it as a file)."""

    def __init__(self, handle):
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.handle.write(view)
        self.digest.update(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self.handle.flush()

    def written(self) -> Written:
        return Written(self.size, self.digest.hexdigest())


@contextmanager
def hashing_file(path: Path) -> Iterator[HashingFile]:
    with disk_errors(path), open(path, "wb") as handle:
        yield HashingFile(handle)


# (device, inode, size, mtime) -> sha256 of a file this process hashed: a checkpoint checked once (eval's settings,
# then its weights) is not hashed again; a changed file has another inode, size or mtime.
_HASHED: dict[tuple[int, int, int, int], str] = {}


def sha256_of(path: Path) -> str:
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = file_sha256(path)
    return _HASHED[key]


def first_line(error: BaseException) -> str:
    """The first line of an error's message, whole (a message cut mid-sentence reads as a bug)."""
    text = str(error).strip()
    return text.splitlines()[0].rstrip(" .:") if text else type(error).__name__


def refuse(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"refusing {path}: {why}; nothing in it was used. Pick another checkpoint "
                           f"(--checkpoint last, best or step-N) or train into a new --run-dir")


# --- JSON ---------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise refuse(path, "it is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise refuse(path, f"it is not valid JSON ({first_line(error)})") from None
    if not isinstance(values, dict):
        raise refuse(path, f"it holds a JSON {type(values).__name__}, not an object")
    return values


def write_json(path: Path, values: dict) -> Written:
    data = json.dumps(values, indent=2).encode()
    with disk_errors(path):
        write_atomic(path, lambda temporary: temporary.write_bytes(data))
    return Written(len(data), hashlib.sha256(data).hexdigest())


# --- safetensors --------------------------------------------------------------------------------------
def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Written:
    """Writes tensors (moved to the CPU, made contiguous) and a JSON-able metadata dict as safetensors, hashing
    the bytes as they go out: the format is a little-endian header length, a JSON header of names, types, shapes
    and offsets, then each tensor's raw bytes in header order."""
    flat = {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
    # Widest type first, as safetensors orders them: every tensor's bytes start aligned to its type.
    names = sorted(flat, key=lambda name: (-flat[name].element_size(), name))
    header: dict[str, Any] = {"__metadata__": {METADATA_KEY: json.dumps(metadata if metadata is not None else {})}}
    offset = 0
    for name in names:
        value = flat[name]
        if value.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"cannot store {name} of type {value.dtype} in a checkpoint")
        end = offset + value.numel() * value.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[value.dtype], "shape": list(value.shape),
                        "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the tensors start 8-byte aligned
    with hashing_file(path) as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name in names:
            out.write(_raw_bytes(flat[name]))
    return out.written()


def _raw_bytes(tensor: torch.Tensor):
    """A contiguous tensor's bytes as they lie in memory (little-endian on every platform torch supports)."""
    assert sys.byteorder == "little", "safetensors stores little-endian values"
    return tensor.reshape(-1).view(torch.uint8).numpy()


def load_tensors(path: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file written by `save_tensors`; CheckpointError naming it otherwise."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise refuse(path, "it is missing")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (a handle, not a dict)
        metadata = json.loads(header.get(METADATA_KEY, "{}"))
    except (SafetensorError, OSError, ValueError) as error:
        raise refuse(path, f"it is not a readable safetensors file ({first_line(error)})") from None
    return tensors, metadata


# --- DeepSpeed's torch.save files --------------------------------------------------------------------
def _importable(dotted: str):
    """The object a dotted name refers to, or None when its module or the name does not exist here."""
    import importlib

    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def load_weights_only(path: str | Path, map_location=None, allowed: tuple[str, ...] = DEEPSPEED_VALUE_TYPES):
    """`torch.load(weights_only=True)`: tensors and plain containers only, plus the named value types.
    A pickle that refers to anything else (os.system, ...) is refused before any object of it exists."""
    # A type this DeepSpeed does not have cannot be in a file it wrote: only the importable ones are allowed.
    types = [kind for kind in map(_importable, allowed) if kind is not None]
    try:
        with torch.serialization.safe_globals(types):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise refuse(Path(path), "it is missing") from None
    except Exception as error:  # noqa: BLE001 - a damaged file makes the unpickler raise anything (KeyError, ...)
        named = re.search(r"GLOBAL ([\w.]+)", str(error))
        why = (f"it is a pickle that refers to {named.group(1)}, which no checkpoint needs" if named
               else f"it is not a readable torch file ({first_line(error)})")
        raise refuse(Path(path), why) from None


# --- optimizer state ----------------------------------------------------------------------------------
def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A torch optimizer's state_dict as (tensors, JSON): tensors named `state.<param>.<key>`."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = _encode(value)
    return tensors, {"param_groups": _encode(state["param_groups"]), "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], metadata: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in metadata.get("scalars", {}).items():
        state.setdefault(int(index), {}).update({key: _decode(value) for key, value in values.items()})
    return {"state": state, "param_groups": _decode(metadata["param_groups"])}


def _encode(value: Any) -> Any:
    """JSON for param-group values: tuples (Adam's betas) and non-finite floats survive the round trip."""
    if isinstance(value, tuple):
        return {"tuple": [_encode(item) for item in value]}
    if isinstance(value, list):
        return [_encode(item) for item in value]
    if isinstance(value, dict):
        return {"dict": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint's JSON")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(item) for item in value]
    if isinstance(value, dict):
        if "tuple" in value:
            return tuple(_decode(item) for item in value["tuple"])
        if "dict" in value:
            return {_decode(k): _decode(v) for k, v in value["dict"]}
        return float(value["float"])
    return value


# --- random number generators -------------------------------------------------------------------------
def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """Every generator a training step draws from: Python's, NumPy's, torch's CPU and CUDA ones."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"torch_cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    metadata = {"python": [version, list(python_state), gauss],
                "numpy": [kind, int(position), int(has_gauss), float(cached)]}
    return tensors, metadata


def restore_rng(tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    version, python_state, gauss = metadata["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, position, has_gauss, cached = metadata["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[name] for name in sorted((n for n in tensors if n.startswith("torch_cuda.")),
                                             key=lambda n: int(n.split(".")[1]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --- disk space ---------------------------------------------------------------------------------------
@contextmanager
def disk_errors(path: Path):
    """Turns a full disk (ENOSPC, EDQUOT) while writing `path` into a DiskFullError."""
    try:
        yield
    except OSError as error:
        if error.errno in _NO_SPACE:
            raise DiskFullError(f"disk full while writing {path}") from None
        raise


def gigabytes(count: int) -> str:
    return f"{count / 1e9:.2f} GB"
