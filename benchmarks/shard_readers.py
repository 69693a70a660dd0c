"""Reading shards without decoding them: diffmic's reader (its own tar parser; fsspec for URLs, the sha256 checked
as the bytes arrive) against webdataset's (tarfile; its gopen for URLs), from a local folder and from an S3 bucket.
The measurement that decided whether webdataset reads diffmic's shards: it does not (see the README).

webdataset has no s3:// opener of its own (it needs `pipe:aws s3 cp ...`, or an https URL for its curl handler), so
it is given presigned https URLs of the same objects. Every source is read `--rounds` times, interleaved.

    python benchmarks/shard_readers.py --s3 s3://bucket/prefix [--images 768] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import fsspec
import webdataset
from data import make_folder

from diffmic.data import ShardOptions, read_manifest, shard_dataset
from diffmic.data.shardio import iter_shard_samples, read_shard
from diffmic.data.storage import Fetching, upload_file


def readers(folder: Path, url: str) -> dict:
    """name -> a function reading every train sample once, returning how many it read."""
    local, remote = read_manifest(folder), read_manifest(url)
    entries = local.splits["train"].shards
    fs = fsspec.filesystem("s3")
    signed = [fs.url(f"{url}/{entry.file}", expires=3600) for entry in entries]

    def wds(urls):
        return sum(1 for _ in webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))

    return {
        "diffmic, local folder": lambda: sum(1 for e in entries for _ in iter_shard_samples(folder / e.file)),
        "webdataset, local folder": lambda: wds([str(folder / entry.file) for entry in entries]),
        "diffmic, s3:// (fsspec, sha256 checked)":
            lambda: sum(1 for e in entries for _ in read_shard(remote.shard_file(e), Fetching(retries=0))),
        "webdataset, presigned https (curl)": lambda: wds(signed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--s3", required=True, help="s3://bucket/prefix to upload the shards to")
    parser.add_argument("--images", type=int, default=768, help="HAM10000-sized JPEGs to generate")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    url = args.s3.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="diffmic-readers-") as work:
        root = Path(work)
        make_folder(root / "raw", args.images, 600, 450, ".jpg", 2)
        manifest = shard_dataset(ShardOptions(dataset="imagefolder", root=root / "raw", out=root / "shards",
                                              test_fraction=0.1, val_fraction=0.0, workers=2))
        for path in sorted((root / "shards").iterdir(), key=lambda path: path.name == "manifest.json"):
            upload_file(path, f"{url}/{path.name}")
        count = manifest.splits["train"].count
        rates: dict[str, list[float]] = {}
        load = os.getloadavg()[0]
        for _ in range(args.rounds):
            for name, read in readers(root / "shards", url).items():
                started = time.perf_counter()
                assert read() == count, name
                rates.setdefault(name, []).append(count / (time.perf_counter() - started))
    megabytes = sum(entry.bytes for entry in manifest.splits["train"].shards) / 2**20
    print(f"{count} samples in {len(manifest.splits['train'].shards)} shards ({megabytes:.1f} MB, 224 px JPEG), "
          f"{args.rounds} interleaved rounds, load average {load:.1f} before and {os.getloadavg()[0]:.1f} after")
    for name, values in rates.items():
        print(f"{name:<42}{statistics.median(values):>9.0f} samples/s (median; {min(values):.0f}-{max(values):.0f})")


if __name__ == "__main__":
    main()
