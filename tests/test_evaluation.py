"""`diffmic eval` and `diffmic predict` on a tiny trained run: process-count invariance, exactly-once,
outputs, and the mistakes users make."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from PIL import Image

from data_fixtures import imagefolder_layout
from diffmic.data import ShardOptions, read_manifest, shard_dataset
from engine_helpers import accelerate_launch, diffmic, diffmic_here

pytestmark = pytest.mark.timeout(900)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def single_process_eval(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval1")
    # One thread, like each of the two processes below: equal thread counts give bit-equal arithmetic.
    result = diffmic(["eval", "--run", str(tiny_run), "--checkpoint", "last", "--out", str(out), "--no-progress"],
                     threads=1)
    return out, result


def test_one_and_two_processes_give_identical_predictions(tiny_run, single_process_eval, tmp_path):
    one, _ = single_process_eval
    two = tmp_path / "eval2"
    accelerate_launch(["-m", "diffmic", "eval", "--run", str(tiny_run), "--checkpoint", "last", "--out", str(two),
                       "--no-progress"])
    assert (one / "predictions.csv").read_bytes() == (two / "predictions.csv").read_bytes()
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert first["accuracy"] == second["accuracy"] and first["macro_f1"] == second["macro_f1"]


def test_every_test_key_appears_exactly_once_with_uneven_shards(digits_shards, single_process_eval):
    out, _ = single_process_eval
    manifest = read_manifest(digits_shards)
    counts = [entry.count for entry in manifest.split_info("test").shards]
    assert len(set(counts)) > 1  # a short last shard: the two ranks read different amounts
    rows = read_csv(out / "predictions.csv")
    assert [row["key"] for row in rows] == manifest.split_info("test").keys


def test_outputs_are_complete_and_consistent(single_process_eval, digits_shards):
    out, result = single_process_eval
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "auroc_macro_ovr", "kappa_quadratic", "per_class",
                "dcg_accuracy", "dcg_macro_f1", "num_images", "sampler", "steps", "n_samples", "seconds",
                "images_per_s", "checkpoint", "manifest_sha256", "ece", "brier", "nll", "dcg_ece", "dcg_brier",
                "dcg_nll", "uncertainty_auroc", "selective_accuracy"):
        assert key in metrics, key
    rows = read_csv(out / "predictions.csv")
    assert metrics["num_images"] == len(rows) == read_manifest(digits_shards).split_info("test").count
    assert metrics["n_samples"] == 2
    correct = sum(row["label"] == row["predicted"] for row in rows)
    assert metrics["accuracy"] == pytest.approx(correct / len(rows))
    assert {"uncertainty", "spread_0", "prob_9", "dcg_predicted"} <= set(rows[0])
    assert set(metrics["selective_accuracy"]) == {"100%", "90%", "80%", "70%"}
    assert metrics["selective_accuracy"]["100%"] == pytest.approx(metrics["accuracy"])
    for name in ("confusion_matrix.png", "trajectory.png", "reliability.png", "selective.png"):
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 100
    assert "accuracy" in result.stdout and "metrics.json" in result.stdout


def test_predict_on_a_folder_of_five_images_gives_five_rows(tiny_run, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (40 + i, 30), (20 * i, 0, 0)).save(folder / f"image{i}.png")
    out = tmp_path / "predicted.csv"
    result = diffmic_here(["predict", "--run", str(tiny_run), "--checkpoint", "last", "--out", str(out), str(folder)])
    assert result.returncode == 0, result.stderr
    rows = read_csv(out)
    assert len(rows) == 5 and {row["file"] for row in rows} == {str(folder / f"image{i}.png") for i in range(5)}
    assert all(abs(sum(float(row[f"prob_{c}"]) for c in "0123456789") - 1) < 1e-4 for row in rows)
    assert "5 image(s)" in result.stdout


@pytest.mark.parametrize("problem", ["missing run", "no checkpoint", "corrupt checkpoint", "unknown split",
                                     "other classes", "another class count", "another image size",
                                     "unreadable image", "zero steps", "zero samples", "unknown sampler",
                                     "predict with zero steps"])
def test_user_mistakes_give_one_message_and_a_non_zero_exit(problem, tiny_run, digits_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    args = ["eval", "--run", str(run), "--checkpoint", "last", "--out", str(tmp_path / "out"), "--no-progress"]
    # eval cannot change the model: a mismatch names the shards to use, never a setting to set.
    shards_advice = "evaluate it on the shards it was trained with"
    expected = {"missing run": "does not exist", "no checkpoint": "no complete checkpoint 'step-999'",
                "corrupt checkpoint": "model.safetensors", "unknown split": "train, val, test",
                "other classes": "classes", "another class count": shards_advice,
                "another image size": "holds 64px images", "unreadable image": "not a readable image",
                "zero steps": "--steps: got 0, expected at least 1",
                "zero samples": "--n-samples: got 0, expected at least 1",
                "unknown sampler": "--sampler: got 'bogus', expected one of 'respaced', 'truncated', 'ddim'",
                "predict with zero steps": "--steps: got 0, expected at least 1"}[problem]
    if problem == "missing run":
        args[2] = str(tmp_path / "nowhere")
    elif problem == "no checkpoint":
        args[4] = "step-999"
    elif problem == "corrupt checkpoint":
        last = sorted(run.glob("checkpoints/step-*"), key=lambda p: int(p.name[5:]))[-1]
        (last / "model.safetensors").write_bytes(b"not a checkpoint")
    elif problem == "unknown split":
        args += ["--split", "holdout"]
    elif problem == "another class count":
        imagefolder_layout(tmp_path / "three", per_class=4)
        shard_dataset(ShardOptions(dataset="imagefolder", root=tmp_path / "three", out=tmp_path / "other", size=32,
                                   val_fraction=0, workers=1))
        args += ["--shards", str(tmp_path / "other")]
    elif problem in ("other classes", "another image size"):
        other = tmp_path / "other"
        shutil.copytree(digits_shards, other)
        manifest = json.loads((other / "manifest.json").read_text())
        if problem == "another image size":
            manifest["image_size"] = 64
        else:
            manifest["classes"] = [f"c{i}" for i in range(10)]
        (other / "manifest.json").write_text(json.dumps(manifest))
        args += ["--shards", str(other)]
    elif problem == "unreadable image":
        (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
        args = ["predict", "--run", str(run), "--checkpoint", "last", "--out", str(tmp_path / "p.csv"),
                str(tmp_path / "broken.png")]
    elif problem == "predict with zero steps":
        Image.new("RGB", (32, 32)).save(tmp_path / "image.png")
        args = ["predict", "--run", str(run), "--checkpoint", "last", "--out", str(tmp_path / "p.csv"), "--steps", "0",
                str(tmp_path / "image.png")]
    else:  # the sampling options: 0 is refused, not read as "the config's value"
        args += {"zero steps": ["--steps", "0"], "zero samples": ["--n-samples", "0"],
                 "unknown sampler": ["--sampler", "bogus"]}[problem]
    result = diffmic_here(args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in " ".join(result.stderr.split()) and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "set data." not in result.stderr
    assert not (tmp_path / "out" / "metrics.json").exists() and not (tmp_path / "p.csv").exists()


def test_eval_on_a_changed_shard_stops_with_one_line_naming_it(tiny_run, digits_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(digits_shards, copy)
    shard = copy / "test-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    result = diffmic_here(["eval", "--run", str(tiny_run), "--checkpoint", "last", "--shards", str(copy),
                           "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "test-000001.tar: sha256 differs" in result.stderr and f"diffmic verify {copy}" in result.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()
