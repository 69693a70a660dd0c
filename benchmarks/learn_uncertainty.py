"""Which uncertainty finds the mistakes? Every measure of diffmic.diffusion.uncertainty (CARD's interval width
and t-test, the chains' disagreement and spread, the entropy of the prediction, the DCG's entropy and
1 - max probability) and candidate combinations, scored on the full DiffMIC runs of benchmarks/learn_budget.py
from the chains they kept (chains.npz): no sampling, seconds per run.

    python benchmarks/learn_uncertainty.py --work-dir runs/budget [--json uncertainty.json]

For each data stream (group), budget (joint epochs) and chain count (5, 20), mean ± sample std over the
seeds of:
- the uncertainty AUROC: how well the measure tells the diffusion's wrong predictions from its right ones;
- selective accuracy at 90, 80 and 70% coverage: the accuracy of the diffusion's predictions on the share of
  images the measure is most certain about (the rest referred);
- calibration of the probabilities: ECE and NLL of the diffusion (eval.probability positive_part), of the
  softmax of the chains' mean state with a temperature fitted by NLL (cross-fitted: fitted on one half of the
  test images, scored on the other, and back; the argmax never moves), and of the DCG.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from diffmic.diffusion.probability import chain_probabilities
from diffmic.diffusion.uncertainty import MEASURES, ChainOutputs, uncertainty
from diffmic.evaluation.calibration import (
    calibration_metrics,
    fitted_temperature,
    selective_accuracy,
    uncertainty_auroc,
)

CHAIN_COUNTS = (5, 20)
COVERAGES = (0.9, 0.8, 0.7)


def combinations(outputs: ChainOutputs) -> dict[str, np.ndarray]:
    """Candidates that join the chains and the DCG (each part already in 0..1)."""
    mean_probs = (outputs.probs + outputs.dcg_probs) / 2
    return {"dcg_max_prob + disagreement": (uncertainty("dcg_max_prob", outputs)
                                            + uncertainty("disagreement", outputs)) / 2,
            "1 - max of mean(diffusion, DCG)": 1.0 - mean_probs.max(axis=1)}


def cross_fitted_softmax(state: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Each half of the images scored with the temperature fitted on the other half."""
    halves = (np.arange(len(labels)) % 2 == 0, np.arange(len(labels)) % 2 == 1)
    probs = np.zeros_like(state)
    temperatures = []
    for fit, score in (halves, halves[::-1]):
        temperature = fitted_temperature(state[fit], labels[fit])
        probs[score] = chain_probabilities(torch.from_numpy(state[score][:, None]), "softmax", temperature).numpy()
        temperatures.append(temperature)
    return probs, temperatures


def analyse_run(path: Path) -> list[dict]:
    data = np.load(path)
    labels, dcg_probs = data["labels"], data["dcg_probs"].astype(np.float64)
    run = path.parent.name  # full-eE-sS
    epochs, seed = int(run.split("-e")[1].split("-")[0]), int(run.rsplit("-s", 1)[1])
    rows = []
    for chains in CHAIN_COUNTS:
        y0 = data[f"y0_{chains}"].astype(np.float64)
        probs = chain_probabilities(torch.from_numpy(y0), "positive_part").numpy()
        outputs = ChainOutputs(y0, probs, dcg_probs)
        measures = {name: uncertainty(name, outputs) for name in MEASURES}
        measures.update(combinations(outputs))
        row = {"group": path.parent.parent.name, "epochs": epochs, "seed": seed, "chains": chains,
               "accuracy": float((probs.argmax(axis=1) == labels).mean()), "auroc": {}, "selective": {}}
        for name, values in measures.items():
            row["auroc"][name] = uncertainty_auroc(labels, probs, values)
            row["selective"][name] = selective_accuracy(labels, probs, values, COVERAGES)
        tempered, temperatures = cross_fitted_softmax(y0.mean(axis=1), labels)
        row["calibration"] = {"diffusion": calibration_metrics(labels, probs),
                              "diffusion, tempered softmax": calibration_metrics(labels, tempered),
                              "DCG": calibration_metrics(labels, dcg_probs)}
        row["temperatures"] = temperatures
        rows.append(row)
    return rows


def cell(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def report(rows: list[dict]) -> list[str]:
    lines = []
    names = list(rows[0]["auroc"])
    for group in sorted({row["group"] for row in rows}):
        for chains in CHAIN_COUNTS:
            mine = [row for row in rows if row["group"] == group and row["chains"] == chains]
            budgets = sorted({row["epochs"] for row in mine})
            lines += ["", f"{group} data stream, {chains} chains: uncertainty AUROC (wrong vs right) by budget", "",
                      "| measure | " + " | ".join(f"{e} epochs" for e in budgets) + " |",
                      "|---|" + "---|" * len(budgets)]
            for name in names:
                lines.append(f"| {name} | " + " | ".join(
                    cell([row["auroc"][name] for row in mine if row["epochs"] == e]) for e in budgets) + " |")
            lines += ["", f"{group}, {chains} chains: selective accuracy at 90 / 80 / 70% coverage", "",
                      "| measure | " + " | ".join(f"{e} epochs" for e in budgets) + " |",
                      "|---|" + "---|" * len(budgets)]
            for name in names:
                cells = []
                for e in budgets:
                    runs = [row for row in mine if row["epochs"] == e]
                    cells.append(" / ".join(f"{statistics.mean(r['selective'][name][f'{round(c * 100)}%'] for r in runs):.3f}"
                                            for c in COVERAGES))
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines += ["", f"{group}, {chains} chains: calibration (ECE / NLL)", "",
                      "| probabilities | " + " | ".join(f"{e} epochs" for e in budgets) + " |",
                      "|---|" + "---|" * len(budgets)]
            for source in rows[0]["calibration"]:
                cells = []
                for e in budgets:
                    runs = [row for row in mine if row["epochs"] == e]
                    cells.append(" / ".join(cell([r["calibration"][source][k] for r in runs]) for k in ("ece", "nll")))
                lines.append(f"| {source} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True, help="benchmarks/learn_budget.py's --work-dir")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args()
    paths = sorted(args.work_dir.glob("*/full-e*-s*/chains.npz"))
    if not paths:
        raise SystemExit(f"no full DiffMIC run with kept chains under {args.work_dir}")
    rows = [row for path in paths for row in analyse_run(path)]
    print("\n".join(report(rows)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
