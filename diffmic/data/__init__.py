"""Data: dataset layouts -> WebDataset shards + manifest (`shard_dataset`), checks (`verify_shards`), and
the train / eval streams every later stage reads (`train_loader`, `eval_loader`). A shard folder is a local
path or a URL (storage.py).

The streams need torch; they are imported on first use so that `diffmic info` and `diffmic verify`
start without it.
"""

from __future__ import annotations

# The modules holding the dataset layouts, in the order `diffmic shard --help` lists them: importing them
# registers their layouts (layouts.py), so any import from diffmic.data sees all of them.
from . import sources, presplit, digits  # noqa: F401  # isort: skip
from .images import preprocess_image
from .manifest import Manifest, ManifestError, ShardEntry, SplitInfo, read_manifest, steps_per_epoch
from .sharding import ShardOptions, ShardWarning, shard_dataset
from .sources import ShardError
from .storage import StorageError, absolute_location, as_location, is_url
from .verify import verify_shards

_TORCH_NAMES = ("train_loader", "eval_loader", "eval_transform", "TrainLoader", "EvalLoader")


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        from . import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module 'diffmic.data' has no attribute {name!r}")


def shard_dir_for(data) -> str:
    """The shard folder a DataConfig points at: data.shards, or shards/<data.dataset> when empty."""
    return data.shards or f"shards/{data.dataset}"


__all__ = ["Manifest", "ManifestError", "ShardEntry", "ShardError", "ShardOptions", "ShardWarning", "SplitInfo",
           "StorageError", "absolute_location", "as_location", "is_url", "eval_loader", "eval_transform",
           "preprocess_image", "read_manifest", "shard_dataset", "shard_dir_for", "steps_per_epoch", "train_loader",
           "verify_shards", "TrainLoader", "EvalLoader"]
