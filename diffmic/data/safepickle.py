"""Reading the authors' pickled split lists without trusting them.

A pickle runs code only through objects it looks up by name (GLOBAL / STACK_GLOBAL, and the
REDUCE / BUILD / NEWOBJ opcodes that need such an object) or through persistent ids. The unpickler below
resolves no name at all and has no persistent loader, so the plain containers the lists are made of load,
and anything else stops at the first lookup, before a single callable exists.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

PLAIN_TYPES = (list, dict, str, int)


class UnsafePickleError(ValueError):
    """The file is not made only of lists, dicts, strings and integers; nothing in it was run."""


class _NoObjectsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise UnsafePickleError(f"it refers to {module}.{name}, and only plain lists, dicts, strings and "
                                f"integers are accepted; the file was not executed")

    def persistent_load(self, pid):
        raise UnsafePickleError("it uses persistent ids; only plain lists, dicts, strings and integers "
                                "are accepted; the file was not executed")


def _check_plain(value, where: str = "top level") -> None:
    """Loading without lookups already excludes objects; this also excludes the plain values we do not
    expect (floats, bytes, tuples, sets, None), so the caller sees exactly the four types."""
    if isinstance(value, bool) or not isinstance(value, PLAIN_TYPES):
        raise UnsafePickleError(f"{where} holds a {type(value).__name__}; only lists, dicts, strings and "
                                f"integers are accepted")
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_plain(item, f"item {index}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, f"a key of {where}")
            _check_plain(item, f"{where}[{key!r}]")


def load_plain_pickle(path: Path):
    """The content of a pickle made only of lists, dicts, strings and integers; UnsafePickleError
    (naming the file) for anything else, raised before any object of it is built."""
    try:
        value = _NoObjectsUnpickler(io.BytesIO(Path(path).read_bytes())).load()
        _check_plain(value)
    except UnsafePickleError as error:
        raise UnsafePickleError(f"refusing {path}: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            RecursionError) as error:
        raise UnsafePickleError(f"refusing {path}: not a readable pickle ({error!r})") from None
    return value
