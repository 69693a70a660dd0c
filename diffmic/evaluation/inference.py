"""Distributed inference over a split: each process samples its own disjoint part, results are
gathered once at the end.

Every chain's noise is drawn from a generator seeded by (run seed, sample key), and eval batches never
cross a shard boundary, so a sample's prediction does not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import EvalConfig
from ..diffusion.uncertainty import ChainOutputs, available_measures, uncertainty


@dataclass
class SplitPredictions:
    keys: list[str]
    labels: np.ndarray  # (N,)
    probs: np.ndarray  # (N, C)
    dcg_probs: np.ndarray  # (N, C)
    y0: np.ndarray | None = None  # (N, n_samples, C) every chain's final state; None without a diffusion
    spread: np.ndarray | None = None  # (N, C), n_samples > 1
    trajectory: list[tuple[int, np.ndarray]] = field(default_factory=list)  # [(t, (N, C) chain mean)]

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def dcg_predicted(self) -> np.ndarray:
        return self.dcg_probs.argmax(axis=1)

    @property
    def chain_outputs(self) -> ChainOutputs:
        """What the uncertainty measures read (diffmic.diffusion.uncertainty)."""
        return ChainOutputs(self.y0, self.probs, self.dcg_probs)

    def uncertainty(self, measure: str) -> np.ndarray | None:
        """(N,) the named uncertainty measure, or None where these predictions cannot give it (a chain measure
        with one chain per image, or without a diffusion)."""
        outputs = self.chain_outputs
        return uncertainty(measure, outputs) if measure in available_measures(outputs) else None

    def reordered(self, keys: list[str]) -> "SplitPredictions":
        """The same predictions in the order of `keys` (the manifest's)."""
        where = {key: i for i, key in enumerate(self.keys)}
        index = np.array([where[key] for key in keys], dtype=np.int64)
        take = lambda a: None if a is None else a[index]  # noqa: E731
        return SplitPredictions(list(keys), self.labels[index], self.probs[index], self.dcg_probs[index],
                                take(self.y0), take(self.spread),
                                [(t, states[index]) for t, states in self.trajectory])


def sample_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def per_sample_noise(keys: list[str], seed: int, slots: int, n_samples: int, classes: int) -> torch.Tensor:
    """(slots, B * n_samples, C) standard normals, rows image-major, each image's from its own seed."""
    blocks = [torch.randn((slots, n_samples, classes), generator=torch.Generator().manual_seed(sample_seed(seed, key)))
              for key in keys]
    return torch.stack(blocks, dim=1).reshape(slots, len(keys) * n_samples, classes)


@torch.no_grad()
def predict_batches(model, batches, device, seed: int, sampling: EvalConfig, record_every: int = 0,
                    autocast=None, on_batch=None) -> SplitPredictions:
    """Runs `model.predict` over this process's batches (no collective inside)."""
    parts: dict[str, list] = {"keys": [], "labels": [], "probs": [], "dcg_probs": [], "y0": [], "spread": []}
    trajectory: dict[int, list] = {}
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        noise = None
        if model.denoiser is not None:
            noise = per_sample_noise(batch["key"], seed, sampling.steps + 1, sampling.n_samples,
                                     model.num_classes).to(device)
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            prediction = model.predict(images, sampling, noise=noise, record_every=record_every)
        parts["keys"].extend(batch["key"])
        parts["labels"].append(batch["label"].numpy())
        parts["probs"].append(prediction.probs.float().cpu().numpy())
        parts["dcg_probs"].append(prediction.dcg_probs.float().cpu().numpy())
        if prediction.y0 is not None:
            parts["y0"].append(prediction.y0.float().cpu().numpy())
        if prediction.spread is not None:
            parts["spread"].append(prediction.spread.float().cpu().numpy())
        for t, states in prediction.trajectory or []:
            trajectory.setdefault(t, []).append(states.float().mean(dim=1).cpu().numpy())
        if on_batch is not None:
            on_batch(len(batch["key"]))
    return _assemble(parts, trajectory, model.num_classes)


def _assemble(parts: dict, trajectory: dict, classes: int) -> SplitPredictions:
    def stack(name, width):
        return np.concatenate(parts[name]) if parts[name] else np.zeros((0, width) if width else 0, np.float32)

    return SplitPredictions(
        parts["keys"], stack("labels", 0).astype(np.int64), stack("probs", classes), stack("dcg_probs", classes),
        np.concatenate(parts["y0"]) if parts["y0"] else None,
        stack("spread", classes) if parts["spread"] else None,
        sorted(((t, np.concatenate(states)) for t, states in trajectory.items()), key=lambda item: -item[0]))


def merge(parts: list[SplitPredictions]) -> SplitPredictions:
    """Concatenates every process's predictions (processes with no samples included)."""
    def join(name):
        values = [getattr(p, name) for p in parts if len(p.keys)]
        if not values or values[0] is None:
            return None
        return np.concatenate(values)

    keys = [key for p in parts for key in p.keys]
    filled = [p for p in parts if len(p.keys)]
    if not filled:
        raise ValueError("no process produced any prediction: the split is empty")
    times = [t for t, _ in filled[0].trajectory]
    trajectory = [(t, np.concatenate([dict(p.trajectory)[t] for p in filled])) for t in times]
    return SplitPredictions(keys, join("labels"), join("probs"), join("dcg_probs"), join("y0"),
                            join("spread"), trajectory)


def gather_predictions(local: SplitPredictions, accelerator) -> SplitPredictions:
    """One collective: every process receives every process's predictions."""
    if accelerator is None or accelerator.num_processes == 1:
        return merge([local])
    from accelerate.utils import gather_object

    return merge(gather_object([local]))


def check_keys(predictions: SplitPredictions, expected: list[str], split: str) -> None:
    """Every sample of the split exactly once: no sample lost, none duplicated, none foreign."""
    seen = predictions.keys
    if len(seen) != len(set(seen)) or set(seen) != set(expected):
        duplicated = len(seen) - len(set(seen))
        missing = sorted(set(expected) - set(seen))
        extra = sorted(set(seen) - set(expected))
        raise RuntimeError(f"evaluation of the {split} split saw {len(seen)} samples for {len(expected)} in the "
                           f"manifest: {duplicated} duplicated, missing {missing[:5]}, unexpected {extra[:5]}")
