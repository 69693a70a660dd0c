"""The train and eval streams over a shard folder. Batches are dicts: image (B, 3, S, S) float32
normalised, label (B,) int64, key (list of B sample keys).

Train: every rank runs exactly `steps_per_epoch` full batches. Each (rank, worker) reads shards drawn
with replacement (weighted by their sample counts) through a seeded shuffle buffer, so no rank ever runs
dry and uneven shards cannot make ranks disagree on the epoch length (which would hang DDP). The stream is
a pure function of (shards, config, batch size, seed, epoch, rank, world size, workers): batch g comes from
logical worker g mod W, its augmentation from a generator seeded by g, so resuming at `start_batch=k`
replays the same batches k.. and skips the earlier ones without decoding them.

With `data.balanced_sampling` the train stream draws every class at the same rate (see `class_weights`).

Eval: each rank reads a disjoint set of whole shards, each worker a disjoint subset of those, every sample
once; no resampling, no padding, no collectives.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import AugmentConfig, DataConfig
from .images import augment_image, decode_image, preprocess_image
from .manifest import CorruptShardError, Manifest, ManifestError, read_manifest, steps_per_epoch
from .shardio import ShardReader
from .storage import Fetching, ShardFile, StorageError
from .verify import check_shard_files

SAMPLE_STREAM, AUGMENT_STREAM, BALANCE_STREAM = 0, 1, 2


def _generator(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(part) % 2**63 for part in parts])


def _normaliser(data: DataConfig) -> Callable[[list[Image.Image]], torch.Tensor]:
    """uint8 RGB images -> (B, 3, S, S) float32 (x / 255 - mean) / std. Written for speed (it is a
    third of a worker's time): one copy into a preallocated array, one converting permute, one
    multiply-add on channel planes."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in data.std], dtype=torch.float32).view(1, 3, 1, 1)
    offset = torch.tensor([-m / s for m, s in zip(data.mean, data.std)], dtype=torch.float32).view(1, 3, 1, 1)

    def normalise(images: list[Image.Image]) -> torch.Tensor:
        width, height = images[0].size
        pixels = np.empty((len(images), height, width, 3), dtype=np.uint8)
        for index, image in enumerate(images):
            pixels[index] = image
        batch = torch.empty((len(images), 3, height, width), dtype=torch.float32)
        batch.copy_(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        return batch.mul_(scale).add_(offset)

    return normalise


def eval_transform(data: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> (3, S, S) normalised tensor, exactly as the eval stream sees a sharded image: the
    sharding preprocessing first (a no-op on images that already went through it)."""
    normalise = _normaliser(data)
    return lambda image: normalise([preprocess_image(image, data.image_size)])[0]


def check_compatible(manifest: Manifest, data: DataConfig) -> None:
    if manifest.image_size != data.image_size:
        raise ManifestError(f"{manifest.path}: the shards hold {manifest.image_size}px images but data.image_size "
                            f"is {data.image_size}; set data.image_size={manifest.image_size} or re-shard with "
                            f"--size {data.image_size}")
    if len(manifest.classes) != data.num_classes:
        raise ManifestError(f"{manifest.path}: the shards have {len(manifest.classes)} classes but "
                            f"data.num_classes is {data.num_classes}; set data.num_classes="
                            f"{len(manifest.classes)} or point data.shards at the right folder")


def _private_generator() -> torch.Generator:
    """A DataLoader draws its workers' base seed from the global RNG unless given a generator; the
    streams seed themselves, and leaving the global RNG alone keeps a resumed run's training noise
    identical to an uninterrupted run's."""
    return torch.Generator().manual_seed(0)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which Slurm and taskset set), as the DataLoader
    counts them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_told_about_cap = False


def usable_workers(requested: int) -> int:
    """data.num_workers, at most one per available CPU: more workers only compete for the same cores, and
    every DataLoader would warn about it again each epoch. Said once per process."""
    global _told_about_cap
    cpus = available_cpus()
    if requested <= cpus:
        return requested
    if not _told_about_cap:
        _told_about_cap = True
        warnings.warn(f"data.num_workers={requested} but this process may use {cpus} CPU(s): using {cpus} loader "
                      f"worker(s)", stacklevel=3)
    return cpus


def _relay_errors(items: Iterator[dict]) -> Iterator[dict]:
    """Inside a DataLoader worker: a damaged shard or an unreachable storage becomes one {"error": message}
    item, which `_raise_relayed` raises in the main process as the one line it is (the DataLoader would
    re-raise it with the worker's whole traceback as its message)."""
    try:
        yield from items
    except (CorruptShardError, StorageError) as error:
        yield {"error": str(error), "kind": type(error).__name__}


def _raise_relayed(items) -> Iterator[dict]:
    for item in items:
        if "error" in item:
            raise (StorageError if item["kind"] == StorageError.__name__ else CorruptShardError)(item["error"])
        yield item


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")


@dataclass(frozen=True)
class TrainPlan:
    """Everything one epoch of one rank's training stream depends on (picklable for the workers)."""

    shards: tuple[ShardFile, ...]
    counts: tuple[int, ...]
    image_format: str
    batch_size: int
    steps: int
    start_batch: int
    workers: int  # logical workers: 1 when loading in the main process
    seed: int
    epoch: int
    rank: int
    shuffle_buffer: int
    augment: AugmentConfig
    keep: frozenset[str] | None = None  # the samples of the shards it may use (cross-validation); None: all
    # Expected copies of a sample of each class (data.balanced_sampling); None: every sample once.
    class_weights: tuple[float, ...] | None = None
    fetching: Fetching = Fetching()  # how remote shards are read (cache folder, retries)


def class_weights(class_counts: list[int]) -> tuple[float, ...]:
    """Expected copies per read sample of each class so that every class present is drawn at the same
    rate: w_c = N / (K n_c) with N samples and K classes present (0 for an absent class). The weights
    average 1 over the samples read (sum_c n_c w_c = N), so the stream reads as many samples as it emits.

    Why per-sample repetition and not another mechanism: the stream stays a pure function of its seed
    (the copies come from a seeded generator of their own), keeps its sharding per rank and worker and its
    shuffle buffer (copies enter the buffer like any sample and leave it spread out), and an epoch is still
    `steps_per_epoch` batches, so schedules and checkpoints mean the same. Rejection alone (keep a sample with
    probability n_min / n_c) would read 1 / (K share_min) samples per sample kept, about 12 on HAM10000's
    shares; weighting the shard draw cannot help, since every shard mixes the classes."""
    present = [count for count in class_counts if count > 0]
    total = sum(present)
    return tuple(total / (len(present) * count) if count > 0 else 0.0 for count in class_counts)


def _copies(samples: Iterator[dict], weights: tuple[float, ...], rng: np.random.Generator) -> Iterator[dict]:
    """Each sample floor(w) times, and once more with probability frac(w), w its class's weight."""
    for sample in samples:
        weight = weights[int(sample["cls"])]
        whole = math.floor(weight)
        for _ in range(whole + int(rng.random() < weight - whole)):
            yield sample


MAX_FETCH_AHEAD = 8  # remote shards a loader worker holds in flight at most (in memory, or in the cache)


def _kept(plan: TrainPlan, rng: np.random.Generator, reads: int) -> Iterator[dict]:
    """Samples of shards drawn with replacement (weighted by their sample counts), those in `keep`; endless. In a
    loader worker, remote shards are fetched while the one before is read (`_next_draws` knows which; not with
    class copies, whose number the buffer's draws depend on)."""
    weights = np.asarray(plan.counts, dtype=np.float64) / sum(plan.counts)
    in_worker = get_worker_info() is not None and plan.class_weights is None
    reader = ShardReader(plan.fetching, ahead=MAX_FETCH_AHEAD if in_worker else 0)
    position = 0  # samples yielded so far
    while True:
        index = int(rng.choice(len(plan.shards), p=weights))
        samples = reader.read(plan.shards[index])
        if reader.fetches_ahead(plan.shards[index]):
            reader.prefetch([plan.shards[drawn] for drawn in _next_draws(rng, weights, plan, position, index, reads)])
        for sample in samples:
            if plan.keep is None or sample["__key__"] in plan.keep:
                position += 1
                yield sample


def _next_draws(rng: np.random.Generator, weights: np.ndarray, plan: TrainPlan, position: int, index: int,
                reads: int) -> list[int]:
    """The shards to fetch now, among those `_kept` draws after shard `index` (whose first selected sample is at
    stream position `position`): the next one, and every one that starts while the shuffle buffer fills (a worker
    reads those back to back when it starts; fetching more at once only slows those), at most MAX_FETCH_AHEAD; none
    that starts at or after position `reads`, which the epoch never reads. Drawn by the same calls on a copy of the
    generator: between two shard draws, `shuffled_samples` draws one buffer slot for each sample that finds its
    buffer full (positions from plan.shuffle_buffer on), and nothing else."""
    ahead, upcoming = copy.deepcopy(rng), []
    while len(upcoming) < MAX_FETCH_AHEAD:
        count = plan.counts[index]
        for _ in range(max(0, position + count - max(position, plan.shuffle_buffer))):
            ahead.integers(plan.shuffle_buffer)
        position += count  # where the next shard starts
        if position >= reads or (upcoming and position >= plan.shuffle_buffer):
            break
        index = int(ahead.choice(len(plan.shards), p=weights))
        upcoming.append(index)
    return upcoming


def shuffled_samples(plan: TrainPlan, logical_worker: int, batches: int | None = None) -> Iterator[dict]:
    """Undecoded samples of shards drawn with replacement, through a shuffle buffer; endless. `batches`: how many
    batches the caller takes (it bounds the shards fetched ahead); None: no bound."""
    rng = _generator(plan.seed, plan.epoch, plan.rank, logical_worker, SAMPLE_STREAM)
    # To yield n samples the buffer takes in n + shuffle_buffer.
    reads = math.inf if batches is None else batches * plan.batch_size + plan.shuffle_buffer
    samples = _kept(plan, rng, reads)
    if plan.class_weights is not None:  # its own generator: the shard draws and the buffer stay as they were
        samples = _copies(samples, plan.class_weights,
                          _generator(plan.seed, plan.epoch, plan.rank, logical_worker, BALANCE_STREAM))
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < plan.shuffle_buffer:
            buffer.append(sample)
            continue
        position = int(rng.integers(len(buffer)))
        yield buffer[position]
        buffer[position] = sample


def augmented_batch(samples: list[dict], plan: TrainPlan, batch_index: int,
                    normalise: Callable[[list[Image.Image]], torch.Tensor]) -> dict:
    rng = _generator(plan.seed, plan.epoch, plan.rank, batch_index, AUGMENT_STREAM)
    images = []
    for sample in samples:
        hflip, vflip, turn = rng.random(), rng.random(), rng.uniform(-1.0, 1.0)
        images.append(augment_image(decode_image(sample[plan.image_format]),
                                    hflip=plan.augment.hflip and hflip < 0.5,
                                    vflip=plan.augment.vflip and vflip < 0.5,
                                    angle=float(turn * plan.augment.rotation)))
    return {"image": normalise(images), "label": torch.tensor([int(sample["cls"]) for sample in samples]),
            "key": [sample["__key__"] for sample in samples]}


def worker_train_batches(plan: TrainPlan, physical_worker: int, normalise) -> Iterator[dict]:
    """The batches g >= start_batch with g mod W == this worker's logical id, in order. The DataLoader
    asks its workers round-robin starting at worker 0, so physical worker p plays logical worker
    (p + start_batch) mod W: its first batch is then exactly batch start_batch + p."""
    logical = (physical_worker + plan.start_batch) % plan.workers
    batch_indexes = range(logical, plan.steps, plan.workers)
    samples = shuffled_samples(plan, logical, len(batch_indexes))
    for batch_index in batch_indexes:
        chosen = [next(samples) for _ in range(plan.batch_size)]
        if batch_index >= plan.start_batch:  # earlier batches are drawn but never decoded
            yield augmented_batch(chosen, plan, batch_index, normalise)


class _TrainStream(IterableDataset):
    def __init__(self, plan: TrainPlan, normalise):
        self.plan, self.normalise = plan, normalise

    def __iter__(self):
        info = get_worker_info()
        return _relay_errors(worker_train_batches(self.plan, info.id if info else 0, self.normalise))


class TrainLoader:
    """One epoch of one rank. `len()` is steps_per_epoch; iterating yields batches start_batch.. of it."""

    def __init__(self, plan: TrainPlan, num_workers: int, normalise):
        self.plan, self.num_workers, self.normalise = plan, num_workers, normalise

    def __len__(self) -> int:
        return self.plan.steps

    def __iter__(self) -> Iterator[dict]:
        if self.num_workers == 0:
            return worker_train_batches(self.plan, 0, self.normalise)
        return _raise_relayed(DataLoader(_TrainStream(self.plan, self.normalise), batch_size=None,
                                         num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                                         generator=_private_generator()))


def train_loader(shard_dir, data: DataConfig, batch_size: int, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, num_workers: int | None = None, start_batch: int = 0) -> TrainLoader:
    """The training stream of the train split (less fold `data.fold` when cross-validating) for one epoch
    of one rank (see the module docstring)."""
    _check_rank(rank, world_size)
    manifest = read_manifest(shard_dir, data.fetch_retries)  # mid-run: a lost connection is tried again
    check_compatible(manifest, data)
    selection = manifest.selection("train", data.fold)
    steps = steps_per_epoch(manifest, batch_size, world_size, data.fold)
    if not 0 <= start_batch <= steps:
        raise ValueError(f"start_batch {start_batch} is not in 0..{steps} (steps per epoch)")
    check_shard_files(manifest, selection.shards, Fetching.of(data))  # every rank draws from every train shard
    workers = usable_workers(data.num_workers if num_workers is None else num_workers)
    plan = TrainPlan(shards=tuple(manifest.shard_file(entry) for entry in selection.shards),
                     counts=tuple(selection.counts), image_format=manifest.image_format,
                     batch_size=batch_size, steps=steps, start_batch=start_batch, workers=max(workers, 1),
                     seed=seed, epoch=epoch, rank=rank, shuffle_buffer=data.shuffle_buffer,
                     augment=data.augment, keep=selection.keep,
                     # the train split's class counts: folds are stratified, so a fold selection has its shares
                     class_weights=class_weights(list(manifest.split_info("train").class_counts.values()))
                     if data.balanced_sampling else None, fetching=Fetching.of(data))
    return TrainLoader(plan, workers, _normaliser(data))


def eval_batches(shards: list[ShardFile], image_format: str, batch_size: int, normalise,
                 keep: frozenset[str] | None = None, fetching: Fetching = Fetching()) -> Iterator[dict]:
    """Every sample of `shards` (in `keep`, when given) once, in order. Batches never cross a shard
    boundary (each shard's last batch may be partial), so a sample meets the same batch mates whatever the
    number of ranks and workers, and batch-dependent floating-point rounding cannot make results depend on
    them."""
    reader = ShardReader(fetching, ahead=int(get_worker_info() is not None))  # the next shard downloads meanwhile
    for index, shard in enumerate(shards):
        pending: list[dict] = []
        samples = reader.read(shard)
        if reader.fetches_ahead(shard):
            reader.prefetch(shards[index + 1:index + 2])
        for sample in samples:
            if keep is not None and sample["__key__"] not in keep:
                continue
            pending.append(sample)
            if len(pending) == batch_size:
                yield _eval_batch(pending, image_format, normalise)
                pending = []
        if pending:
            yield _eval_batch(pending, image_format, normalise)


def _eval_batch(samples: list[dict], image_format: str, normalise) -> dict:
    return {"image": normalise([decode_image(sample[image_format]) for sample in samples]),
            "label": torch.tensor([int(sample["cls"]) for sample in samples]),
            "key": [sample["__key__"] for sample in samples]}


class _EvalStream(IterableDataset):
    def __init__(self, worker_shards: list[list[ShardFile]], image_format: str, batch_size: int, normalise,
                 keep: frozenset[str] | None, fetching: Fetching):
        self.worker_shards, self.image_format = worker_shards, image_format
        self.batch_size, self.normalise, self.keep, self.fetching = batch_size, normalise, keep, fetching

    def __iter__(self):
        info = get_worker_info()
        shards = self.worker_shards[info.id if info else 0]
        return _relay_errors(eval_batches(shards, self.image_format, self.batch_size, self.normalise, self.keep,
                                          self.fetching))


class EvalLoader:
    """One rank's share of a split; `len()` is the number of batches it yields (possibly 0)."""

    def __init__(self, worker_shards: list[list[ShardFile]], shard_counts: list[int], image_format: str,
                 batch_size: int, normalise, in_processes: bool, keep: frozenset[str] | None = None,
                 fetching: Fetching = Fetching()):
        self.worker_shards, self.shard_counts = worker_shards, shard_counts
        self.image_format, self.batch_size, self.normalise = image_format, batch_size, normalise
        self.keep, self.fetching = keep, fetching
        self.num_workers = len(worker_shards) if in_processes else 0

    def __len__(self) -> int:
        return sum(math.ceil(count / self.batch_size) for count in self.shard_counts)

    def __iter__(self) -> Iterator[dict]:
        if self.num_workers == 0:
            shards = self.worker_shards[0] if self.worker_shards else []
            return eval_batches(shards, self.image_format, self.batch_size, self.normalise, self.keep, self.fetching)
        stream = _EvalStream(self.worker_shards, self.image_format, self.batch_size, self.normalise, self.keep,
                             self.fetching)
        return _raise_relayed(DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                         pin_memory=torch.cuda.is_available(), generator=_private_generator()))


def eval_loader(shard_dir, split: str, data: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1,
                num_workers: int | None = None) -> EvalLoader:
    """Every sample of `split` exactly once across all ranks and workers (see the module docstring); with
    `data.fold` >= 0, "val" is that fold of the train split. Workers beyond this rank's shard count would
    get nothing to read, so they are not started."""
    _check_rank(rank, world_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    manifest = read_manifest(shard_dir, data.fetch_retries)  # mid-run: a lost connection is tried again
    check_compatible(manifest, data)
    # Every rank checks the whole split, so that a damaged shard stops all ranks alike instead of leaving
    # the others waiting for the one that stopped.
    selection = manifest.selection(split, data.fold)
    check_shard_files(manifest, selection.shards, Fetching.of(data))
    # Shards without a selected sample are left out before they are shared between ranks.
    filled = [(entry, count) for entry, count in zip(selection.shards, selection.counts) if count]
    entries, counts = [entry for entry, _ in filled[rank::world_size]], [count for _, count in filled[rank::world_size]]
    requested = usable_workers(data.num_workers if num_workers is None else num_workers)
    readers = max(requested, 1)  # 0 workers still means one reader: the main process
    workers = min(readers, len(entries))
    if len(entries) < readers:
        warnings.warn(f"rank {rank} of {world_size} has {len(entries)} of the {selection.name} split's "
                      f"{len(selection.shards)} shards for {readers} reader(s); "
                      f"using {workers}. Re-shard with a smaller --shard-size to read in parallel", stacklevel=2)
    worker_shards = [[manifest.shard_file(entry) for entry in entries[worker::workers]] for worker in range(workers)]
    return EvalLoader(worker_shards, counts, manifest.image_format, batch_size, _normaliser(data),
                      in_processes=requested > 0, keep=selection.keep, fetching=Fetching.of(data))
