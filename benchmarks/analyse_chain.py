"""Where does the chain win or lose against its own guidance model? Re-evaluates trained DiffMIC runs (no
training) on their test split and prints, for each run and as a mean over the runs:

1. the denoiser's error at fixed timesteps against the trivial predictor eps_hat = 0 (whose MSE is E[eps^2] = 1),
   on the true label's forward state y_t, for every test image and for the two rarest classes;
2. per class, how often the chain's argmax differs from the DCG's, and whether the change was right or wrong
   (at the run's own eval settings);
3. macro F1 and macro AUROC of the diffusion for each sampler (respaced, truncated, ddim), number of steps,
   number of chains, with and without the EMA weights, under each probability rule (eval.probability:
   positive_part, softmax, vote). The vote rule over several chains is the `aggregate: vote` of the config.
   The DCG's own figures are printed alongside.

    python benchmarks/analyse_chain.py RUN_DIR [RUN_DIR ...] [--checkpoint last] [--json analysis.json]
                                       [--results earlier.json ...]

Every chain's noise comes from the same per-image seeds as `diffmic eval`, so the default row reproduces the
run's `diffmic eval --checkpoint last` figures. The run folders of benchmarks/learn_imbalanced.py --work-dir
are what it was written for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

RAREST = ("vasc", "df")
TIMESTEPS = (1, 10, 50, 100, 250, 500, 750, 999)
# (label, sampler, steps, chains, EMA): the run's own setting first, then one change at a time.
SETTINGS = (("respaced 20 x1", "respaced", 20, 1, True),
            ("respaced 100 x1", "respaced", 100, 1, True),
            ("respaced 250 x1", "respaced", 250, 1, True),
            ("truncated 20 x1", "truncated", 20, 1, True),
            ("truncated 250 x1", "truncated", 250, 1, True),
            ("ddim 10 x1", "ddim", 10, 1, True),
            ("ddim 100 x1", "ddim", 100, 1, True),
            ("respaced 20 x5", "respaced", 20, 5, True),
            ("respaced 5 x20", "respaced", 5, 20, True),  # with 100 x1 and 20 x5: one cost, steps x chains = 100
            ("respaced 20 x20", "respaced", 20, 20, True),
            ("respaced 100 x20", "respaced", 100, 20, True),
            ("respaced 20 x1 no EMA", "respaced", 20, 1, False),
            ("respaced 20 x5 no EMA", "respaced", 20, 5, False))


def load(run_dir: Path, checkpoint: str, ema: bool):
    from diffmic import checkpoint as ckpt

    info = ckpt.find_checkpoint(run_dir, checkpoint)
    model = ckpt.build_model_from_checkpoint(info, ema)
    model.eval()
    return info, model


def test_split(info, run_dir: Path) -> tuple[list[str], torch.Tensor, np.ndarray]:
    from diffmic.data import eval_loader
    from diffmic.evaluation.runner import shards_of

    keys, images, labels = [], [], []
    for batch in eval_loader(shards_of(run_dir, info, None), "test", info.config.data, 128, num_workers=0):
        keys.extend(batch["key"])
        images.append(batch["image"])
        labels.append(batch["label"].numpy())
    return keys, torch.cat(images), np.concatenate(labels)


def chains(model, keys, images, seed: int, sampler: str, steps: int, n_samples: int, batch: int = 128):
    """Every chain's final state (N, n_samples, C) and the DCG's probabilities (N, C), with eval's noise. A model
    without a diffusion (`basic`) has no chains: None and the classifier's probabilities."""
    from diffmic.config import EvalConfig
    from diffmic.evaluation.inference import per_sample_noise

    sampling = EvalConfig(sampler=sampler, steps=steps, n_samples=n_samples)
    states, dcg = [], []
    for start in range(0, len(keys), batch):
        part = keys[start:start + batch]
        noise = per_sample_noise(part, seed, steps + 1, n_samples, model.num_classes)
        prediction = model.predict(images[start:start + batch], sampling, noise=noise)
        if prediction.y0 is not None:
            states.append(prediction.y0)
        dcg.append(prediction.dcg_probs.numpy())
    return torch.cat(states) if states else None, np.concatenate(dcg)


def figures(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, float]:
    from diffmic.evaluation.metrics import classification_metrics

    metrics = classification_metrics(labels, probs, class_names=classes)
    return {"macro_f1": metrics["macro_f1"], "auroc": metrics["auroc_macro_ovr"],
            **{f"f1_{name}": metrics["per_class"][name]["f1"] for name in RAREST if name in classes}}


@torch.no_grad()
def denoiser_error(model, images: torch.Tensor, labels: np.ndarray, classes: list[str], seed: int) -> dict:
    """MSE(eps_hat, eps) at fixed t on y_t = q(y_t | one-hot label, prior), against MSE(0, eps) (about 1)."""
    import torch.nn.functional as F

    target = torch.as_tensor(labels)
    y0 = F.one_hot(target, model.num_classes).float()
    prior = model.priors(model.guidance(images))["fused"]
    features = model.denoiser.encode(images)
    rare = torch.isin(target, torch.tensor([classes.index(name) for name in RAREST if name in classes]))
    generator = torch.Generator().manual_seed(seed)
    rows = {}
    for step in TIMESTEPS:
        t = torch.full((len(labels),), step, dtype=torch.long)
        eps = torch.randn(y0.shape, generator=generator)
        error = (model.denoiser(features, model.schedule.q_sample(y0, prior, t, eps), prior, t).float() - eps) ** 2
        trivial = eps ** 2
        rows[str(step)] = {"all": float(error.mean() / trivial.mean()),
                      "rare": float(error[rare].mean() / trivial[rare].mean()) if rare.any() else None}
    return rows


def class_flips(labels: np.ndarray, probs: np.ndarray, dcg_probs: np.ndarray, classes: list[str]) -> dict:
    """Per true class: images, DCG right, chain right, changed, changed to right, changed to wrong."""
    chain, dcg = probs.argmax(axis=1), dcg_probs.argmax(axis=1)
    changed = chain != dcg
    return {name: {"images": int((labels == c).sum()), "dcg_right": int(((dcg == c) & (labels == c)).sum()),
                   "chain_right": int(((chain == c) & (labels == c)).sum()),
                   "changed": int((changed & (labels == c)).sum()),
                   "to_right": int((changed & (labels == c) & (chain == c)).sum()),
                   "to_wrong": int((changed & (labels == c) & (dcg == c)).sum())}
            for c, name in enumerate(classes)}


def analyse(run_dir: Path, checkpoint: str) -> dict:
    from diffmic.diffusion.probability import PROBABILITY_RULES, chain_probabilities

    info, models = None, {}
    for ema in (True, False):
        info, models[ema] = load(run_dir, checkpoint, ema)
    config, classes = info.config, info.classes
    keys, images, labels = test_split(info, run_dir)
    seed = config.train.seed
    result = {"run": str(run_dir), "variant": config.model.variant, "images": len(keys),
              "denoiser_error": denoiser_error(models[True], images, labels, classes, seed), "settings": {}}
    own = (config.eval.sampler, config.eval.steps, config.eval.n_samples, config.eval.use_ema)
    for label, sampler, steps, n_samples, ema in ((f"own: {own[0]} {own[1]} x{own[2]}", *own), *SETTINGS):
        started = time.perf_counter()
        states, dcg_probs = chains(models[ema], keys, images, seed, sampler, steps, n_samples)
        rules = {rule: chain_probabilities(states, rule).numpy() for rule in PROBABILITY_RULES}
        result["settings"][label] = {rule: figures(labels, probs, classes) for rule, probs in rules.items()}
        result["settings"][label]["seconds"] = time.perf_counter() - started
        result["settings"][label]["ms_per_image"] = 1000 * result["settings"][label]["seconds"] / len(keys)
        if label.startswith("own"):
            result["dcg"] = figures(labels, dcg_probs, classes)
            result["flips"] = class_flips(labels, rules[config.eval.probability], dcg_probs, classes)
    return result


def mean(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def report(results: list[dict]) -> list[str]:
    """Markdown tables: mean ± sample std over the runs given."""
    from diffmic.diffusion.probability import PROBABILITY_RULES

    lines = [f"{len(results)} run(s): " + ", ".join(r["run"] for r in results), "",
             "Denoiser MSE relative to eps_hat = 0 (below 1: it predicts the noise better than nothing)", "",
             "| t | " + " | ".join(str(t) for t in TIMESTEPS) + " |", "|---|" + "---|" * len(TIMESTEPS)]
    for part in ("all", "rare"):
        lines.append(f"| {part} | " + " | ".join(mean([r["denoiser_error"][str(t)][part] for r in results])
                                                  for t in TIMESTEPS) + " |")
    lines += ["", "Chain vs DCG per true class, summed over the runs (own eval settings)", "",
              "| class | images | DCG right | chain right | changed | to right | to wrong |",
              "|---|---|---|---|---|---|---|"]
    for name in results[0]["flips"]:
        cells = [sum(r["flips"][name][key] for r in results)
                 for key in ("images", "dcg_right", "chain_right", "changed", "to_right", "to_wrong")]
        lines.append(f"| {name} | " + " | ".join(str(c) for c in cells) + " |")
    columns = [(rule, metric) for metric in ("macro_f1", "auroc") for rule in PROBABILITY_RULES]
    lines += ["", "Macro F1 and AUROC by sampling setting and probability rule", "",
              "| setting | " + " | ".join(f"{m} {r}" for r, m in columns) + " | s/run | ms/image |",
              "|---|" + "---|" * (len(columns) + 2)]
    lines.append("| DCG alone | " + " | ".join(mean([r["dcg"][m] for r in results]) for _, m in columns) + " | | |")
    for label in results[0]["settings"]:
        cells = [mean([r["settings"][label][rule][metric] for r in results]) for rule, metric in columns]
        seconds = statistics.mean(r["settings"][label]["seconds"] for r in results)
        per_image = statistics.mean(r["settings"][label].get("ms_per_image", float("nan")) for r in results)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {seconds:.0f} | {per_image:.2f} |")
    lines += ["", "Rare-class F1 (vasc / df) by setting, positive_part rule", "",
              "| setting | " + " | ".join(f"f1_{n}" for n in RAREST) + " |", "|---|" + "---|" * len(RAREST),
              "| DCG alone | " + " | ".join(mean([r["dcg"].get(f"f1_{n}") for r in results]) for n in RAREST) + " |"]
    for label in results[0]["settings"]:
        lines.append(f"| {label} | " + " | ".join(mean([r["settings"][label]["positive_part"].get(f"f1_{n}")
                                                          for r in results]) for n in RAREST) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run folders of diffusion variants (c1, c2, full)")
    parser.add_argument("--checkpoint", default="last")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    parser.add_argument("--results", type=Path, nargs="+", default=[],
                        help="--json files of earlier calls: their runs join the report without being sampled again")
    args = parser.parse_args()
    if not args.runs and not args.results:
        parser.error("name at least one run folder or --results file")
    torch.manual_seed(0)
    results = [result for path in args.results for result in json.loads(path.read_text())]
    for run_dir in args.runs:
        started = time.perf_counter()
        results.append(analyse(run_dir, args.checkpoint))
        print(f"{run_dir}: analysed in {time.perf_counter() - started:.0f} s", flush=True)
    print("\n".join(report(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
