"""What the checkpoints' sha256 costs at the paper config, and what the shard pre-check costs for a HAM10000-size
shard set.

Checkpoint: the files of a training checkpoint (model, EMA, a filled Adam state) written the way the trainer writes
them, with the sha256 computed from the bytes on their way out and with that digest switched off; then read back as a
resume reads them, with and without checking every file against its sha256. Repeated, the best of each kept. The
files were just written, so reading them comes from the page cache: the load figures are the hashing's CPU cost, not
a disk's.

Shards: 10015 images at the real resolution (450x600 JPEGs, centre-cropped to 224 px as `diffmic shard` stores them)
synthesized into tar shards, then the pre-check a training runs before its first step (size and sha256 of every
shard of every split), cold (cache dropped where the system allows) and warm.

    python benchmarks/checkpoint_checksum.py [--config configs/ham10000.yaml] [--repeats 3] [--images 10015]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import torch

from diffmic.checkpoint import files as checkpoint_files
from diffmic.checkpoint import record as ckpt
from diffmic.checkpoint import without_pretrained
from diffmic.checkpoint.files import flatten_optimizer, load_tensors, save_tensors
from diffmic.config import load_config
from diffmic.engine.optim import build_optimizer
from diffmic.models import build_model

REPO = Path(__file__).resolve().parents[1]


def training_state(config) -> dict[str, tuple[dict, dict | None]]:
    """file name -> (tensors, metadata) of a training checkpoint: one Adam step on zero gradients fills every moment."""
    model = build_model(without_pretrained(config))
    optimizer = build_optimizer(model, config.train)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    weights = {name: value.float() for name, value in model.state_dict().items()}
    ema = {name: value.clone() for name, value in model.denoiser.state_dict().items()}
    return {ckpt.MODEL_FILE: (weights, None), ckpt.EMA_FILE: (ema, None),
            ckpt.OPTIMIZER_FILE: flatten_optimizer(optimizer.state_dict())}


@contextlib.contextmanager
def digest_off():
    """The same writer with its sha256 switched off: what saving cost before checksums."""
    original = checkpoint_files.HashingFile.write

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.handle.write(view)
        self.size += view.nbytes
        return view.nbytes

    checkpoint_files.HashingFile.write = write
    try:
        yield
    finally:
        checkpoint_files.HashingFile.write = original


def save_all(state: dict, folder: Path) -> float:
    start = time.perf_counter()
    for name, (tensors, metadata) in state.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, tensors, metadata)  # as the trainer: into the page cache, no fsync
    return time.perf_counter() - start


def load_all(folder: Path, names: list[str], checked: bool) -> float:
    """Seconds to read every file as a resume does: checked against its sha256 (or not), then each tensor copied out
    of the file's memory map (load_state_dict's copy; safetensors alone maps the file and reads nothing yet)."""
    start = time.perf_counter()
    for name in names:
        if checked:
            checkpoint_files._HASHED.clear()  # every load hashes, as a new process does
            checkpoint_files.sha256_of(folder / name)
        tensors, _ = load_tensors(folder / name)
        for value in tensors.values():
            value.clone()
    return time.perf_counter() - start


def checkpoint_figures(config_path: str, repeats: int) -> None:
    config = load_config(config_path, ["train.mixed_precision=no"])
    state = training_state(config)
    with tempfile.TemporaryDirectory(dir=REPO) as scratch:
        folder = Path(scratch)
        hashed = min(save_all(state, folder) for _ in range(repeats))
        with digest_off():
            plain = min(save_all(state, folder) for _ in range(repeats))
        size = sum((folder / name).stat().st_size for name in state)
        names = list(state)
        checked = min(load_all(folder, names, True) for _ in range(repeats))
        unchecked = min(load_all(folder, names, False) for _ in range(repeats))
    print(f"checkpoint at {config_path}: {size / 1e9:.2f} GB in {len(state)} tensor files")
    print(f"  save: {plain:.2f} s without the sha256, {hashed:.2f} s with it (+{hashed - plain:.2f} s, "
          f"{100 * (hashed - plain) / plain:+.0f}%)")
    print(f"  load (a resume, every file): {unchecked:.2f} s unchecked, {checked:.2f} s checked "
          f"(+{checked - unchecked:.2f} s)")


def synthesize_shards(folder: Path, images: int) -> Path:
    """HAM10000-like shards: `images` photographs-like JPEGs of 450x600, cropped and resized to 224 as stored."""
    import numpy as np
    from PIL import Image

    from diffmic.data import ShardOptions, shard_dataset

    source = folder / "images"
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (450, 600, 3), dtype=np.uint8)
    for index in range(images):
        label = index % 7
        pixels = np.roll(base, index * 7, axis=1) // 2 + 40 * label  # distinct bytes per image, skin-like noise
        path = source / f"class{label}" / f"img{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
    out = folder / "shards"
    shard_dataset(ShardOptions(dataset="imagefolder", root=source, out=out, size=224, workers=os.cpu_count() or 1,
                               test_fraction=0.2))
    return out


def drop_page_cache(paths: list[Path]) -> bool:
    """Asks the kernel to forget the shards' pages (posix_fadvise), so the next read comes from the disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def precheck_figures(images: int) -> None:
    from diffmic.data import read_manifest
    from diffmic.data import verify as shard_verify

    with tempfile.TemporaryDirectory(dir=REPO) as scratch:
        shards = synthesize_shards(Path(scratch), images)
        manifest = read_manifest(shards)
        entries = [entry for split in manifest.splits for entry in manifest.split_info(split).shards]
        paths = [shards / entry.file for entry in entries]
        size = sum(path.stat().st_size for path in paths)
        timings = {}
        for state in ("cold", "warm"):
            if state == "cold" and not drop_page_cache(paths):
                continue
            shard_verify._MATCHED.clear()  # a new process: nothing matched yet
            start = time.perf_counter()
            shard_verify.check_shard_files(manifest, entries)
            timings[state] = time.perf_counter() - start
    count = sum(manifest.split_info(split).count for split in manifest.splits)
    shown = ", ".join(f"{seconds:.2f} s {state}" for state, seconds in timings.items())
    print(f"shard pre-check: {count} images at 224 px in {len(entries)} shards ({size / 1e9:.2f} GB): {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "ham10000.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=10015, help="0: no shard pre-check figures")
    args = parser.parse_args()
    checkpoint_figures(args.config, args.repeats)
    if args.images:
        precheck_figures(args.images)


if __name__ == "__main__":
    main()
