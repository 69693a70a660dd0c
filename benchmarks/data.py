"""Training-stream throughput: diffmic shards versus decoding and resizing the raw files every time.

Generates HAM10000-sized JPEGs (600x450) and APTOS-sized PNGs (2000x1500) in a temporary folder, shards
them with `diffmic shard`, then measures images per second of
  - shards: `diffmic.data.train_loader` (decode a 224 px JPEG, augment, normalise), and
  - raw:    a DataLoader over the original files (PIL decode, centre crop, resize to 224, augment, normalise),
with the same batch size, loader workers and augmentation; and what the sha256 check of the train shards
costs, which every process runs once before it first reads them (`check s`, and as a share of one epoch).
About a minute on 2 cores.

With `--s3 s3://bucket/prefix` (the client's usual variables: AWS_ENDPOINT_URL, keys, region) it also uploads the
HAM10000-like shards there and measures, in rounds that interleave them, an epoch of the training stream from the
local folder, from the bucket, and from the bucket through `data.cache_dir` (its first epoch fills the cache, the
second reads it): a few minutes more. Each epoch has a start-up cost (the loader workers start and fill their shuffle
buffers), which weighs more on a remote store: the README's figures use `--ham 4096`, an epoch of 3,680 images.

    python benchmarks/data.py [--ham 768] [--aptos 40] [--workers 2] [--s3 s3://bucket/prefix] [--rounds 6]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import multiprocessing
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from diffmic.config import AugmentConfig, DataConfig
from diffmic.data import Manifest, ShardOptions, shard_dataset, storage, train_loader, verify
from diffmic.data.images import augment_image, preprocess_image

from timing import device_and_threads

BATCH_SIZE = 32
MEASURE_SECONDS = 3.0


@functools.lru_cache(maxsize=2)
def _disc_and_noise(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.ogrid[0:height, 0:width]
    radius = np.hypot(x - width / 2, y - height / 2) / (min(width, height) / 2)
    noise = np.random.default_rng(0).integers(-3, 4, size=(height, width, 3), dtype=np.int16)
    return np.clip(1.1 - radius, 0, 1).astype(np.float32)[..., None], noise


def synthetic_photo(width: int, height: int, seed: int) -> np.ndarray:
    """A lit disc on a dark background with fine noise: compresses like a real medical photograph,
    neither like a flat colour nor like pure noise. Each seed tints it and shifts the noise."""
    disc, noise = _disc_and_noise(width, height)
    rng = np.random.default_rng(seed)
    tinted = (disc * rng.uniform(120, 220, size=3).astype(np.float32)).astype(np.int16)
    return np.clip(tinted + np.roll(noise, int(rng.integers(height)), axis=0), 0, 255).astype(np.uint8)


def write_image(job: tuple[Path, int, int, int]) -> Path:
    path, width, height, seed = job
    image = Image.fromarray(synthetic_photo(width, height, seed))
    # zlib level 1 only makes generating fast; decoding a PNG costs about the same at any level
    image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path, compress_level=1)
    return path


def make_folder(root: Path, count: int, width: int, height: int, suffix: str, workers: int) -> list[Path]:
    """An imagefolder layout with two classes."""
    jobs = []
    for index in range(count):
        folder = root / f"class_{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"img_{index:04d}{suffix}", width, height, index))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(write_image, jobs)


class RawFiles(Dataset):
    """The baseline: every epoch opens the original file and redoes the preprocessing."""

    def __init__(self, paths: list[Path], data: DataConfig):
        self.paths, self.data = paths, data
        self.mean = torch.tensor(data.mean).view(3, 1, 1)
        self.std = torch.tensor(data.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        draw = random.Random(index)
        with Image.open(self.paths[index]) as opened:
            image = preprocess_image(opened, self.data.image_size)
        image = augment_image(image, draw.random() < 0.5, False, draw.uniform(-30, 30))
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255
        return (pixels - self.mean) / self.std, index % 2


def raw_images_per_second(paths: list[Path], data: DataConfig) -> float:
    loader = DataLoader(RawFiles(paths, data), batch_size=BATCH_SIZE, shuffle=True, num_workers=data.num_workers,
                        drop_last=True)
    return measure(lambda epoch: loader)


def shard_images_per_second(shards: Path, data: DataConfig, batch_size: int = BATCH_SIZE,
                            seconds: float = MEASURE_SECONDS) -> float:
    return measure(lambda epoch: train_loader(shards, data, batch_size, seed=0, epoch=epoch), seconds)


def measure(epoch_loader, seconds: float = MEASURE_SECONDS) -> float:
    """Images per second over whole epochs (worker start-up included, as in training), at least
    `seconds` of them."""
    images, start, epoch = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for batch in epoch_loader(epoch):
            images += len(batch[1] if isinstance(batch, list) else batch["label"])
        epoch += 1
    return images / (time.perf_counter() - start)


def checksum_seconds(manifest) -> float:
    """The first check of a process: every train shard hashed (the memo of earlier checks emptied)."""
    storage._MATCHED.clear()
    started = time.perf_counter()
    verify.check_shard_files(manifest, manifest.splits["train"].shards)
    return time.perf_counter() - started


def training_data(name: str, workers: int, image_size: int = 224) -> DataConfig:
    """The training stream's settings: two classes, hflip + rotation, `workers` loader processes."""
    return DataConfig(dataset=name, num_classes=2, image_size=image_size, num_workers=workers,
                      augment=AugmentConfig(hflip=True, vflip=False, rotation=30.0))


@dataclass
class Sharded:
    paths: list[Path]  # the generated originals
    manifest: Manifest  # of the shards written from them
    generate_s: float
    shard_s: float


def make_shards(root: Path, name: str, count: int, width: int, height: int, suffix: str, workers: int,
                size: int | None = None) -> Sharded:
    """`count` synthetic photographs of width x height in two class folders under root/name/raw, sharded
    into root/name/shards at `size` px (default: the layout's, 224)."""
    started = time.perf_counter()
    paths = make_folder(root / name / "raw", count, width, height, suffix, workers)
    generated = time.perf_counter() - started
    started = time.perf_counter()
    manifest = shard_dataset(ShardOptions(dataset="imagefolder", root=root / name / "raw", out=root / name / "shards",
                                          size=size, test_fraction=0.1, val_fraction=0.0, workers=workers))
    return Sharded(paths, manifest, generated, time.perf_counter() - started)


def benchmark(name: str, root: Path, count: int, width: int, height: int, suffix: str, workers: int) -> dict:
    sharded = make_shards(root, name, count, width, height, suffix, workers)
    manifest = sharded.manifest
    raw_mb = sum(path.stat().st_size for path in sharded.paths) / 2**20
    data = training_data(name, workers)
    train_paths = [path for path in sharded.paths if f"class_{int(path.stem[4:]) % 2}__{path.stem}"
                   in set(manifest.splits["train"].keys)]
    raw = raw_images_per_second(train_paths, data)
    shards = shard_images_per_second(manifest.folder, data)
    check = checksum_seconds(manifest)
    epoch = manifest.splits["train"].count / shards
    shard_mb = sum(entry.bytes for info in manifest.splits.values() for entry in info.shards) / 2**20
    return {"name": name, "images": count, "size": f"{width}x{height}{suffix}", "raw_mb": raw_mb,
            "shard_mb": shard_mb, "generate_s": sharded.generate_s, "shard_s": sharded.shard_s, "raw": raw,
            "shards": shards, "check_s": check, "check_share": check / epoch}


def epoch_images_per_second(shards, data: DataConfig, epochs: range) -> float:
    """Images per second over exactly these epochs (worker start-up included)."""
    images, start = 0, time.perf_counter()
    for epoch in epochs:
        for batch in train_loader(shards, data, BATCH_SIZE, seed=0, epoch=epoch):
            images += len(batch["label"])
    return images / (time.perf_counter() - start)


def upload(folder: Path, url: str) -> None:
    """The shard folder to the bucket, the manifest last (as `diffmic shard --out URL` does)."""
    for path in sorted(folder.iterdir(), key=lambda path: path.name == "manifest.json"):
        storage.upload_file(path, f"{url}/{path.name}")


def object_storage(root: Path, url: str, workers: int, rounds: int) -> dict[str, list[float]]:
    """images/s of the training stream from the local folder, from the bucket, and from the bucket through a cache
    (first and second epoch), each measured once per round, the sources interleaved within a round."""
    folder = root / "ham10000-like" / "shards"
    upload(folder, url)
    data = DataConfig(dataset="ham10000-like", num_classes=2, image_size=224, num_workers=workers,
                      augment=AugmentConfig(hflip=True, vflip=False, rotation=30.0))
    figures: dict[str, list[float]] = {}
    for round_ in range(rounds):
        cache = dataclasses.replace(data, cache_dir=str(root / f"cache-{round_}"))  # empty: the first epoch fills it
        # One epoch each, in this order, every round: a change of the machine's load hits all four alike.
        sources = (("local folder", folder, data, range(1)),
                   ("s3, no cache", url, data, range(1)),
                   ("s3 + cache, epoch 1 (fills it)", url, cache, range(1)),
                   ("s3 + cache, epoch 2", url, cache, range(1, 2)))
        for name, shards, settings, epochs in sources:
            figures.setdefault(name, []).append(epoch_images_per_second(shards, settings, epochs))
    return figures


def print_object_storage(figures: dict[str, list[float]], workers: int, url: str, load: float) -> None:
    """Medians, and the median over rounds of each source's share of the local folder's images/s in that round
    (a round's sources ran under about the same load)."""
    local = figures["local folder"]
    print(f"training stream from {url} (HAM10000-like shards, 224 px, batch {BATCH_SIZE}, {workers} loader workers), "
          f"{len(local)} interleaved rounds; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'source':<32}{'img/s (median)':>15}{'min':>8}{'max':>8}{'of local (paired)':>19}")
    for name, values in figures.items():
        share = statistics.median(value / base for value, base in zip(values, local))
        print(f"{name:<32}{statistics.median(values):>15.1f}{min(values):>8.1f}{max(values):>8.1f}{share:>19.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ham", type=int, default=768, help="HAM10000-sized JPEGs to generate")
    parser.add_argument("--aptos", type=int, default=40, help="APTOS-sized PNGs to generate")
    parser.add_argument("--workers", type=int, default=2, help="loader and encoding processes")
    parser.add_argument("--s3", default="", help="also measure reading the HAM10000-like shards from this URL")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds of the --s3 measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"device: {device_and_threads()} (per loader worker)")
    with tempfile.TemporaryDirectory(prefix="diffmic-bench-") as folder:
        rows = [benchmark("ham10000-like", Path(folder), args.ham, 600, 450, ".jpg", args.workers),
                benchmark("aptos2019-like", Path(folder), args.aptos, 2000, 1500, ".png", args.workers)]
        load = os.getloadavg()[0]
        remote = object_storage(Path(folder), args.s3.rstrip("/"), args.workers, args.rounds) if args.s3 else None
    print(f"training stream, batch {BATCH_SIZE}, {args.workers} loader workers, 224 px, hflip + rotation:")
    print(f"{'dataset':<16}{'images':>7}  {'source':<14}{'raw MB':>8}{'shard MB':>9}{'gen s':>7}{'shard s':>8}"
          f"{'raw img/s':>11}{'shard img/s':>13}{'speed-up':>10}{'check s':>9}{'of epoch':>9}")
    for row in rows:
        print(f"{row['name']:<16}{row['images']:>7}  {row['size']:<14}{row['raw_mb']:>8.1f}{row['shard_mb']:>9.1f}"
              f"{row['generate_s']:>7.1f}{row['shard_s']:>8.1f}{row['raw']:>11.1f}{row['shards']:>13.1f}{row['shards'] / row['raw']:>9.1f}x"
              f"{row['check_s']:>9.3f}{row['check_share']:>8.1%}")
    if remote is not None:
        print_object_storage(remote, args.workers, args.s3, load)


if __name__ == "__main__":
    main()
