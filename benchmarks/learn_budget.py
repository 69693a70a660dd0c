"""Does the diffusion catch up with its DCG when it trains longer? The budget curve of the imbalanced digits
(benchmarks/learn_imbalanced.py's data: scikit-learn's digits as seven classes in HAM10000's shares, 32 px):
full DiffMIC (its diffusion and its own DCG) and the plain ResNet-18 (`basic`) trained at several budgets,
several seeds each, every run scored on the test split with its last checkpoint.

    python benchmarks/learn_budget.py --work-dir runs/budget --group balanced --budgets 6:3,24:3,96:3 \\
                                      --set data.balanced_sampling=true
    python benchmarks/learn_budget.py --work-dir runs/budget --group default --budgets 6:3,24:3,96:1
    python benchmarks/learn_budget.py --work-dir runs/budget --report      # the tables and budget.png

`--budgets E:N,...` trains N seeds (2000, 2001, ...) at E joint epochs (train.epochs). The schedule scales
with the run as the paper's does at 1000 epochs (`budget_settings`): the denoiser's linear learning-rate
warm-up is 4% of the joint epochs (the paper's 40 of 1000), rounded (6 -> 0, 24 -> 1, 96 -> 4); the DCG
warm-up is 1% (the paper's 10 of 1000) but never under the digits budget's 2 epochs, so 2 up to 249 epochs.
The rest is configs/digits.yaml (constant DCG learning rate, half-cosine denoiser learning rate to 0 at the
last epoch, EMA 0.95, 16 noise draws).

Each run lives in WORK/GROUP/VARIANT-eE-sSEED. An interrupted call resumes: a finished run is not trained
again, an interrupted one resumes from its last checkpoint, and a scored one is not sampled again. Each
scored run keeps `chains.npz` (every chain's final state at 5 and at 20 chains, the DCG's probabilities, the
labels) and `result.json`; `--report` reads only those. Two groups can train at once, each in its own call
with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from analyse_chain import chains, load, test_split
from learn_imbalanced import flips, prepare_shards, scores, train_run

CHAIN_COUNTS = (5, 20)  # configs/digits.yaml's eval.n_samples, and the many-chain setting
OUTPUTS = (("full", "diffusion", "diffusion"), ("full", "dcg", "its DCG"), ("basic", "dcg", "basic"))
FIGURES = ("macro_f1", "auroc_macro_ovr", "balanced_accuracy", "f1_vasc", "f1_df")


def budget_settings(epochs: int) -> list[str]:
    """The schedule of a run of `epochs` joint epochs, scaled as the paper's 1000-epoch schedule."""
    return [f"train.epochs={epochs}", f"train.warmup_epochs={round(epochs * 40 / 1000)}",
            f"train.dcg_warmup_epochs={max(2, round(epochs * 10 / 1000))}"]


def parse_budgets(text: str) -> list[tuple[int, int]]:
    budgets = []
    for item in text.split(","):
        epochs, _, seeds = item.partition(":")
        budgets.append((int(epochs), int(seeds or 1)))
    return budgets


@torch.no_grad()
def score_run(run_dir: Path) -> dict:
    """Samples the test split at the run's eval settings (respaced, 20 steps) with 5 and 20 chains, with
    `diffmic eval`'s per-image noise; keeps every chain's final state in chains.npz."""
    from diffmic.diffusion.probability import chain_probabilities

    info, model = load(run_dir, "last", ema=info_uses_ema(run_dir))
    config, classes = info.config, info.classes
    keys, images, labels = test_split(info, run_dir)
    arrays, result = {"labels": labels}, {}
    for n_samples in CHAIN_COUNTS if model.denoiser is not None else (1,):
        started = time.perf_counter()
        states, dcg_probs = chains(model, keys, images, config.train.seed, config.eval.sampler, config.eval.steps,
                                   n_samples)
        arrays["dcg_probs"] = dcg_probs
        if states is None:  # basic: no diffusion
            continue
        arrays[f"y0_{n_samples}"] = states.numpy()
        probs = chain_probabilities(states, config.eval.probability).numpy()
        result[f"diffusion_{n_samples}"] = scores(labels, probs, classes)
        result[f"flips_{n_samples}"] = flips(labels, probs, dcg_probs)
        result[f"seconds_{n_samples}"] = time.perf_counter() - started
    result["dcg"] = scores(labels, arrays["dcg_probs"], classes)
    np.savez_compressed(run_dir / "chains.npz", keys=np.array(keys), classes=np.array(classes), **arrays)
    return result


def info_uses_ema(run_dir: Path) -> bool:
    from diffmic import checkpoint as ckpt

    return ckpt.find_checkpoint(run_dir, "last").config.eval.use_ema


def run_one(shards: Path, folder: Path, variant: str, epochs: int, seed: int, overrides: list[str]) -> dict:
    run_dir = folder / f"{variant}-e{epochs}-s{seed}"
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    trained = train_run(shards, run_dir, variant, 2000 + seed, 32, [*budget_settings(epochs), *overrides])
    row = {"group": folder.name, "variant": variant, "epochs": epochs, "seed": seed, "train_s": trained,
           "overrides": overrides, **score_run(run_dir)}
    done.write_text(json.dumps(row, indent=2))
    return row


def train_group(work: Path, group: str, budgets: list[tuple[int, int]], variants: list[str],
                overrides: list[str]) -> None:
    counts, shards = prepare_shards(work, 32)
    print("classes:", ", ".join(f"{name} {count}" for name, count in counts.items()), flush=True)
    for epochs, seeds in budgets:  # the short budgets first: an interrupted curve still has its left end
        for seed in range(seeds):
            for variant in variants:
                row = run_one(shards, work / group, variant, epochs, seed, overrides)
                parts = [f"{name} F1 {row[key]['macro_f1']:.3f}" for key, name in
                         (("diffusion_5", "diffusion"), ("dcg", "dcg")) if key in row]
                print(f"{group} {variant} e{epochs} s{seed} train_s={row['train_s']:.0f} " + ", ".join(parts),
                      flush=True)


def collect(work: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(work.glob("*/*/result.json"))]


def summarise(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def table(rows: list[dict], group: str, chain_key: str = "diffusion_5") -> list[str]:
    """Markdown: one line per output and budget, mean ± sample std over the seeds."""
    lines = ["| output | epochs | seeds | " + " | ".join(FIGURES) + " |", "|---|---|---|" + "---|" * len(FIGURES)]
    mine = [row for row in rows if row["group"] == group]
    for variant, key, name in OUTPUTS:
        key = chain_key if key == "diffusion" else key
        for epochs in sorted({row["epochs"] for row in mine if row["variant"] == variant}):
            runs = [row[key] for row in mine if row["variant"] == variant and row["epochs"] == epochs]
            cells = []
            for figure in FIGURES:
                mean, spread, _ = summarise([run[figure] for run in runs])
                cells.append(f"{mean:.3f} ± {spread:.3f}")
            lines.append(f"| {name} | {epochs} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict], out: Path) -> Path:
    """budget.png: macro F1 and AUROC against joint epochs, one panel per data stream, one line each for the
    diffusion, its DCG and basic (mean over seeds, bars one sample standard deviation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({row["group"] for row in rows})
    figure, axes = plt.subplots(2, len(groups), figsize=(5.5 * len(groups), 7.5), squeeze=False, sharex=True)
    styles = {"diffusion": ("tab:blue", "o"), "its DCG": ("tab:orange", "s"), "basic": ("tab:green", "^")}
    for column, group in enumerate(groups):
        mine = [row for row in rows if row["group"] == group]
        for line, (figure_key, label) in enumerate((("macro_f1", "macro F1"), ("auroc_macro_ovr", "macro AUROC"))):
            axis = axes[line][column]
            for variant, key, name in OUTPUTS:
                key = "diffusion_5" if key == "diffusion" else key
                budgets = sorted({row["epochs"] for row in mine if row["variant"] == variant})
                stats = [summarise([row[key][figure_key] for row in mine
                                    if row["variant"] == variant and row["epochs"] == e]) for e in budgets]
                if not budgets:
                    continue
                colour, marker = styles[name]
                axis.errorbar(budgets, [s[0] for s in stats], yerr=[s[1] for s in stats], color=colour,
                              marker=marker, capsize=3, label=name)
                for epochs, (_, _, n) in zip(budgets, stats):
                    if n == 1:  # one seed: no bar to read, say so
                        axis.annotate("1 seed", (epochs, stats[budgets.index(epochs)][0]), fontsize=7,
                                      textcoords="offset points", xytext=(4, -10), color=colour)
            axis.set_xscale("log", base=2)
            axis.set_title(f"{group} data stream: {label}")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
            if line == 1:
                axis.set_xlabel("joint training epochs (log scale)")
            axis.legend(loc="lower right")
    for axis in axes.flat:
        ticks = sorted({row["epochs"] for row in rows})
        axis.set_xticks(ticks, [str(t) for t in ticks])
    figure.suptitle("Imbalanced digits, test split: mean ± std over seeds")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def report(work: Path) -> None:
    rows = collect(work)
    if not rows:
        raise SystemExit(f"no scored run under {work}")
    for group in sorted({row["group"] for row in rows}):
        for chain_key in ("diffusion_5", "diffusion_20"):
            print(f"\n{group} data stream, diffusion with {chain_key.split('_')[1]} chains:\n")
            print("\n".join(table(rows, group, chain_key)))
    print(f"\nwrote {plot(rows, work / 'budget.png')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--group", default="default", help="folder of this call's runs (e.g. the data stream)")
    parser.add_argument("--budgets", type=parse_budgets, default=parse_budgets("6:3,24:3,96:3"),
                        help="EPOCHS:SEEDS,... (default 6:3,24:3,96:3)")
    parser.add_argument("--variants", default="full,basic")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    parser.add_argument("--report", action="store_true", help="only print the tables and draw budget.png")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if not args.report:
        train_group(args.work_dir, args.group, args.budgets, args.variants.split(","), args.overrides)
    report(args.work_dir)


if __name__ == "__main__":
    main()
