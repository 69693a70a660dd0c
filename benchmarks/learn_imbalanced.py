"""Does the diffusion earn its place on imbalanced data? The ablations of the paper's Table 2 (basic, c1, c2,
full) trained on scikit-learn's digits arranged as seven classes in HAM10000's shares, with several seeds, and
each diffusion scored against its own guidance model (the DCG, or c1's plain classifier).

The data: NV, two thirds of HAM10000, is the digits 0, 7, 8 and 9 together (a heterogeneous majority class,
as nevi are); MEL, BKL, BCC, AKIEC, VASC and DF are the digits 1 to 6, each cut to its HAM10000 share of
that count (VASC 15 images, DF 12). One seeded 70/30 stratified split, no validation split: every variant
trains the configs/digits.yaml budget and is scored once on the test split with its last checkpoint. Only the
training seed changes between seeds.

    python benchmarks/learn_imbalanced.py [--seeds 3] [--variants basic,c1,c2,full] [--size 32]
                                          [--set KEY=VALUE ...] [--json results.json] [--work-dir DIR]

With --work-dir the data, shards and run folders stay there; calling it again with the same folder evaluates
the runs already trained instead of training them again (benchmarks/analyse_chain.py re-evaluates them too).

Prints one line per run, then mean ± sample standard deviation over the seeds: accuracy, macro F1, balanced
accuracy, macro AUROC, and the F1 of the two rarest classes (VASC, DF), for the diffusion and for the
guidance model alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# HAM10000's class shares (10,015 images: NV 6,705, MEL 1,113, BKL 1,099, BCC 514, AKIEC 327, VASC 142, DF 115).
HAM_SHARES = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}
DIGITS_OF = {"nv": (0, 7, 8, 9), "mel": (1,), "bkl": (2,), "bcc": (3,), "akiec": (4,), "vasc": (5,), "df": (6,)}
RAREST = ("vasc", "df")
COLUMNS = ("accuracy", "macro_f1", "balanced_accuracy", "auroc_macro_ovr", "f1_vasc", "f1_df")


def write_dataset(root: Path, size: int) -> dict[str, int]:
    """The imbalanced digits as a folder-per-class dataset (the PMG2000 layout); returns the class counts."""
    from PIL import Image

    from diffmic.data.digits import digits_images

    images, labels = digits_images(size)
    choose = np.random.default_rng(0)
    majority = sum(int((labels == d).sum()) for d in DIGITS_OF["nv"])
    counts = {}
    for name, digits in DIGITS_OF.items():
        pool = np.flatnonzero(np.isin(labels, digits))
        wanted = len(pool) if name == "nv" else round(majority * HAM_SHARES[name] / HAM_SHARES["nv"])
        chosen = np.sort(choose.permutation(pool)[:wanted])
        (root / name).mkdir(parents=True)
        for index in chosen:
            Image.fromarray(images[index]).save(root / name / f"digit_{index:04d}.png")
        counts[name] = len(chosen)
    return counts


def prepare_shards(scratch: Path, size: int) -> tuple[dict[str, int], Path]:
    """The imbalanced digits and their shards in `scratch` (made once; an earlier call's are reused, since they
    are built from fixed seeds). Returns the class counts and the shard folder."""
    data, shards = scratch / "data", scratch / "shards"
    if shards.exists():
        return {name: len(list((data / name).iterdir())) for name in DIGITS_OF}, shards
    counts = write_dataset(data, size)
    diffmic("shard", "--dataset", "imagefolder", "--root", str(data), "--out", str(shards), "--size", str(size),
            "--test-fraction", "0.3", "--val-fraction", "0", "--seed", "0", "--workers", "1")
    return counts, shards


def diffmic(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "diffmic", *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"diffmic {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def scores(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, float]:
    from diffmic.evaluation.metrics import classification_metrics

    metrics = classification_metrics(labels, probs, class_names=classes)
    row = {key: metrics[key] for key in COLUMNS[:4]}
    row.update({f"f1_{name}": metrics["per_class"][name]["f1"] for name in RAREST})
    return row


def train_run(shards: Path, run_dir: Path, variant: str, seed: int, size: int, overrides: list[str]) -> float:
    """Trains one run (resuming an interrupted one) and returns its training seconds; a run an earlier call
    with the same --work-dir finished is not trained again."""
    # fp32 evaluation, as the README's tables were measured (eval.precision auto would run bf16 on CPUs that have it)
    settings = [f"model.variant={variant}", "data.num_classes=7", f"data.image_size={size}", "train.val_every=0",
                f"train.seed={seed}", "eval.precision=fp32", *overrides]
    timing = run_dir / "train_seconds.json"
    if timing.exists():
        return json.loads(timing.read_text())["train_s"]
    started = time.perf_counter()
    diffmic("train", "--config", str(REPO / "configs" / "digits.yaml"), "--shards", str(shards), "--run-dir",
            str(run_dir), "--no-progress", *[item for setting in settings for item in ("--set", setting)])
    trained = time.perf_counter() - started
    timing.write_text(json.dumps({"train_s": trained}))
    return trained


def train_and_score(shards: Path, run_dir: Path, variant: str, seed: int, size: int, overrides: list[str]) -> dict:
    from diffmic.evaluation.runner import evaluate_run

    trained = train_run(shards, run_dir, variant, seed, size, overrides)
    result = evaluate_run(run_dir, checkpoint="last", out_dir=run_dir / "eval", progress=False)
    predictions, classes = result.predictions, result.metrics["class_names"]
    return {"variant": variant, "seed": seed, "train_s": trained,
            "diffusion": scores(predictions.labels, predictions.probs, classes),
            "dcg": scores(predictions.labels, predictions.dcg_probs, classes),
            "prior_flips": flips(predictions.labels, predictions.probs, predictions.dcg_probs)}


def flips(labels: np.ndarray, probs: np.ndarray, dcg_probs: np.ndarray) -> dict[str, int]:
    """How often the chain's answer differs from its guidance model's, and whether the change was right."""
    chain, dcg = probs.argmax(axis=1), dcg_probs.argmax(axis=1)
    changed = chain != dcg
    return {"changed": int(changed.sum()), "to_right": int((changed & (chain == labels)).sum()),
            "to_wrong": int((changed & (dcg == labels)).sum())}


def summary(rows: list[dict]) -> list[str]:
    """Markdown: one line per variant and model, mean ± sample std over seeds."""
    lines = ["| variant | output | " + " | ".join(COLUMNS) + " | chain vs dcg: changed / to right / to wrong |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for variant in dict.fromkeys(row["variant"] for row in rows):
        mine = [row for row in rows if row["variant"] == variant]
        outputs = ("dcg",) if variant == "basic" else ("diffusion", "dcg")
        for output in outputs:
            cells = []
            for column in COLUMNS:
                values = [row[output][column] for row in mine if row[output][column] is not None]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}" if values else "-")
            flipped = "-" if output == "dcg" else " / ".join(
                str(sum(row["prior_flips"][key] for row in mine)) for key in ("changed", "to_right", "to_wrong"))
            name = {"dcg": "classifier" if variant in ("basic", "c1") else "its DCG", "diffusion": "diffusion"}[output]
            lines.append(f"| {variant} | {name} | " + " | ".join(cells) + f" | {flipped} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", default="basic,c1,c2,full")
    parser.add_argument("--size", type=int, default=32, help="image size (the 8x8 scans lose nothing at 32 px)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    parser.add_argument("--work-dir", type=Path, help="keep the dataset, shards and run folders here (re-evaluate "
                        "them with benchmarks/analyse_chain.py); default: a temporary folder, removed at the end")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        scratch = args.work_dir or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        counts, shards = prepare_shards(Path(scratch), args.size)
        print("classes:", ", ".join(f"{name} {count}" for name, count in counts.items()), flush=True)
        for seed in range(args.seeds):
            for variant in args.variants.split(","):
                row = train_and_score(shards, Path(scratch) / f"{variant}-{seed}", variant, 2000 + seed, args.size,
                                      args.overrides)
                rows.append(row)
                figures = " ".join(f"{key}={value:.3f}" for key, value in row["diffusion"].items() if value is not None)
                dcg = " ".join(f"{key}={value:.3f}" for key, value in row["dcg"].items() if value is not None)
                print(f"{variant:5s} seed={seed} train_s={row['train_s']:.0f} diffusion: {figures} | dcg: {dcg} | "
                      f"flips {row['prior_flips']}", flush=True)
                if args.json:  # after every run, so that an interrupted measurement keeps what it has
                    args.json.write_text(json.dumps({"overrides": args.overrides, "counts": counts, "runs": rows},
                                                    indent=2))
    print("\n".join(summary(rows)))


if __name__ == "__main__":
    main()
