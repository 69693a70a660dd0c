"""`diffmic import-reference`: checkpoints saved by the authors' code (scott-yjyang/DiffMIC) become a run folder.

The authors' checkpoints are built here from stand-in modules that have their module names (their code is
never needed): ConditionalModel (encoder_x.f/g, norm, lin1..3 = ConditionalLinear(lin, embed), unetnorm1..3,
lin4) and the DCG (ds_net.f, left_postprocess_net.gn_conv_last, dn_resnet.f, mil_attn_U/V/w,
classifier_linear), at the tiny digits size so the whole file runs in seconds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import resnet18

from diffmic.checkpoint import find_checkpoint, load_weights
from diffmic.checkpoint.reference import convert_reference, load_reference_files
from diffmic.config import load_config
from diffmic.data import eval_loader, read_manifest
from diffmic.evaluation.inference import predict_batches
from diffmic.evaluation.settings import resolve_eval_settings
from diffmic.models import build_model
from engine_helpers import REPO, diffmic_here

CLASSES, FEATURES, TIMESTEPS, ATTENTION = 10, 64, 1000, 128
SETTINGS = ["data.image_size=32", "model.dcg.k=1", f"model.denoiser.feature_dim={FEATURES}", "eval.steps=4",
            "eval.n_samples=1", "eval.sampler=truncated", "eval.batch_size=64", "data.num_workers=0"]
CONFIG = REPO / "configs" / "digits.yaml"


# --- the authors' layout ------------------------------------------------------------------------------
def resnet_children(drop: tuple[str, ...]) -> nn.Sequential:
    return nn.Sequential(*[module for name, module in resnet18().named_children() if name not in drop])


class Holder(nn.Module):
    """A module that only names its children (their sub-modules without the behaviour)."""

    def __init__(self, **children: nn.Module):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def authors_denoiser(feature_dim: int = FEATURES) -> nn.Module:
    def conditional(inputs: int) -> nn.Module:
        layer = Holder(lin=nn.Linear(inputs, feature_dim), embed=nn.Embedding(TIMESTEPS + 1, feature_dim))
        layer.embed.weight.data.uniform_()
        return layer

    return Holder(encoder_x=Holder(f=resnet_children(("fc",)), g=nn.Linear(512, feature_dim)),
                  norm=nn.BatchNorm1d(feature_dim), lin1=conditional(2 * CLASSES), unetnorm1=nn.BatchNorm1d(feature_dim),
                  lin2=conditional(feature_dim), unetnorm2=nn.BatchNorm1d(feature_dim), lin3=conditional(feature_dim),
                  unetnorm3=nn.BatchNorm1d(feature_dim), lin4=nn.Linear(feature_dim, CLASSES))


def authors_dcg() -> nn.Module:
    return Holder(ds_net=Holder(f=resnet_children(("fc", "avgpool"))),
                  left_postprocess_net=Holder(gn_conv_last=nn.Conv2d(512, CLASSES, 1, bias=False)),
                  dn_resnet=Holder(f=resnet_children(("fc", "avgpool"))),
                  mil_attn_V=nn.Linear(512, ATTENTION, bias=False), mil_attn_U=nn.Linear(512, ATTENTION, bias=False),
                  mil_attn_w=nn.Linear(ATTENTION, 1, bias=False), classifier_linear=nn.Linear(512, CLASSES, bias=False))


def trained_looking(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Its state dict with BatchNorm statistics that are not the defaults, so a lost buffer would show."""
    generator = torch.Generator().manual_seed(seed)
    state = module.state_dict()
    for name, value in state.items():
        if name.endswith("running_mean"):
            value.copy_(0.1 * torch.randn(value.shape, generator=generator))
        elif name.endswith("running_var"):
            value.copy_(0.5 + torch.rand(value.shape, generator=generator))
        elif name.endswith("num_batches_tracked"):
            value.fill_(1234)
    return state


@pytest.fixture(scope="module")
def authors_states() -> dict:
    torch.manual_seed(0)
    denoiser = trained_looking(authors_denoiser(), 1)
    dcg = trained_looking(authors_dcg(), 2)
    ema = {name: value + 0.01 for name, value in authors_denoiser().named_parameters()}
    ema = {name: denoiser[name] + 0.01 * torch.randn_like(denoiser[name]) for name in ema}
    return {"denoiser": denoiser, "dcg": dcg, "ema": ema}


def save_pair(folder: Path, denoiser: dict, dcg: dict, ema: dict | None = None) -> tuple[Path, Path]:
    """Their two lists: [state_dict, optimizer, epoch, step, (EMA)] and [state_dict, optimizer]."""
    folder.mkdir(parents=True, exist_ok=True)
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1]}]}
    ckpt, aux = folder / "ckpt_best.pth", folder / "aux_ckpt_best.pth"
    torch.save([denoiser, optimizer, 41, 777] + ([ema] if ema is not None else []), ckpt)
    torch.save([dcg, optimizer], aux)
    return ckpt, aux


def import_args(ckpt: Path, aux: Path, out: Path, *extra: str) -> list[str]:
    args = ["import-reference", "--ckpt", str(ckpt), "--aux-ckpt", str(aux), "--config", str(CONFIG), "--out", str(out)]
    return args + [item for setting in SETTINGS for item in ("--set", setting)] + list(extra)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """Twenty 32 px images per split in ten class folders: evaluation takes a second, not a minute."""
    from diffmic.data import ShardOptions, shard_dataset

    root = tmp_path_factory.mktemp("images")
    pixels = np.random.default_rng(0)
    for label in range(CLASSES):
        (root / str(label)).mkdir()
        for index in range(4):
            Image.fromarray(pixels.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / str(label) / f"{index}.png")
    out = root.parent / "shards"
    shard_dataset(ShardOptions(dataset="imagefolder", root=root, out=out, size=32, shard_size=16, workers=1,
                               test_fraction=0.5, val_fraction=0.0))
    return out


@pytest.fixture(scope="module")
def imported(authors_states, small_shards, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("authors")
    ckpt, aux = save_pair(folder, authors_states["denoiser"], authors_states["dcg"], authors_states["ema"])
    out = folder / "run"
    result = diffmic_here(import_args(ckpt, aux, out, "--shards", str(small_shards)))
    assert result.returncode == 0, result.stderr
    assert "EMA" in result.stdout
    return out


# --- the mapping --------------------------------------------------------------------------------------
def test_every_weight_lands_where_it_belongs(imported, authors_states):
    weights = load_weights(find_checkpoint(imported, "last"), use_ema=False)
    denoiser, dcg = authors_states["denoiser"], authors_states["dcg"]
    same = {"dcg.global_trunk.stem.0.weight": dcg["ds_net.f.0.weight"],
            "dcg.global_trunk.stem.1.running_var": dcg["ds_net.f.1.running_var"],
            "dcg.global_trunk.layers.3.1.bn2.running_mean": dcg["ds_net.f.7.1.bn2.running_mean"],
            "dcg.local_trunk.layers.0.0.conv1.weight": dcg["dn_resnet.f.4.0.conv1.weight"],
            "dcg.saliency_head.weight": dcg["left_postprocess_net.gn_conv_last.weight"],
            "dcg.mil.gate.weight": dcg["mil_attn_U.weight"], "dcg.mil.value.weight": dcg["mil_attn_V.weight"],
            "dcg.mil.score.weight": dcg["mil_attn_w.weight"],
            "dcg.mil.classifier.weight": dcg["classifier_linear.weight"],
            "denoiser.encoder.trunk.layers.2.0.downsample.1.running_var": denoiser["encoder_x.f.6.0.downsample.1.running_var"],
            "denoiser.encoder.project.bias": denoiser["encoder_x.g.bias"],
            "denoiser.encoder.norm.running_mean": denoiser["norm.running_mean"],
            "denoiser.layer2.linear.weight": denoiser["lin2.lin.weight"], "denoiser.norm3.weight": denoiser["unetnorm3.weight"],
            "denoiser.output.bias": denoiser["lin4.bias"],
            "denoiser.norm1.num_batches_tracked": denoiser["unetnorm1.num_batches_tracked"]}
    for ours, theirs in same.items():
        assert torch.equal(weights[ours], theirs), ours
    # Their embedding row i serves step position i, ours row t serves time t = i + 1.
    theirs = denoiser["lin1.embed.weight"]
    assert torch.equal(weights["denoiser.layer1.gain.weight"][1:], theirs[:-1])
    assert torch.equal(weights["denoiser.layer1.gain.weight"][0], theirs[-1])
    assert len(weights) == len(denoiser) + len(dcg)


def test_the_run_folder_records_its_origin(imported, small_shards):
    run = json.loads((imported / "run.json").read_text())
    origin = run["imported_from"]
    assert origin["epoch"] == 41 and origin["step"] == 777 and len(origin["ckpt_sha256"]) == 64
    assert origin["ckpt"].endswith("ckpt_best.pth") and origin["aux_ckpt"].endswith("aux_ckpt_best.pth")
    assert "EMA" in origin["denoiser_ema"] and run["sessions"][0]["mode"] == "import"
    assert run["manifest_sha256"] == read_manifest(small_shards).digest
    checkpoint = find_checkpoint(imported, "last")
    assert checkpoint.name == "step-777" and checkpoint.has_ema and not checkpoint.has_training_state
    assert (imported / "config.yaml").is_file() and not list(imported.parent.glob(".*importing"))


# --- eval reads it: the same predictions as the weights loaded by hand ---------------------------------
def directly_loaded_model(authors_states, use_ema: bool, folder: Path):
    """The same weights put into diffmic's model by hand: the import's mapping, no run folder."""
    config = load_config(CONFIG, SETTINGS)
    files = load_reference_files(*save_pair(folder, authors_states["denoiser"], authors_states["dcg"],
                                            authors_states["ema"]))
    model = build_model(config)
    weights = convert_reference(files, {name: value.shape for name, value in model.state_dict().items()})
    model.load_state_dict(weights.model)
    if use_ema:
        model.denoiser.load_state_dict(weights.ema, strict=False)  # the shadow has no integer buffers
    return model.eval(), config


def direct_probabilities(model, config, batches) -> dict[str, np.ndarray]:
    result = predict_batches(model, batches, torch.device("cpu"), config.train.seed,
                             resolve_eval_settings(config))
    return dict(zip(result.keys, result.probs))


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_eval_of_the_import_matches_the_weights_loaded_directly(imported, authors_states, small_shards, tmp_path):
    out = tmp_path / "eval"
    # fp32, as the direct computation: the comparison is of weights, not of precisions
    result = diffmic_here(["eval", "--run", str(imported), "--out", str(out), "--no-progress", "--precision", "fp32"])
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "metrics.json").read_text())["ema"] is True  # the authors' EMA, by default
    rows = read_rows(out / "predictions.csv")
    model, config = directly_loaded_model(authors_states, True, tmp_path / "direct")
    expected = direct_probabilities(model, config, eval_loader(small_shards, "test", config.data, 64, 0, 1))
    assert len(rows) == len(expected) == read_manifest(small_shards).split_info("test").count
    worst = max(abs(float(row[f"prob_{c}"]) - expected[row["key"]][c]) for row in rows for c in range(CLASSES))
    assert worst < 2e-6  # the CSV keeps six decimals


def lesion_files(folder: Path) -> list[Path]:
    files = []
    for index in range(3):
        files.append(folder / f"lesion{index}.png")
        Image.fromarray(np.full((40, 48, 3), 60 * index, dtype=np.uint8)).save(files[-1])
    return files


def predict_and_compare(run: Path, files: list[Path], authors_states, use_ema: bool, folder: Path,
                        *flags: str) -> list[dict]:
    """`diffmic predict` of `files` with `flags`, checked against the authors' weights (their EMA when `use_ema`)
    loaded by hand; returns the rows."""
    from diffmic.data import eval_transform
    from diffmic.evaluation.runner import load_images

    out = folder / "predicted.csv"
    result = diffmic_here(["predict", "--run", str(run), "--checkpoint", "last", "--out", str(out), "--precision",
                           "fp32", *flags, *map(str, files)])
    assert result.returncode == 0, result.stderr
    model, config = directly_loaded_model(authors_states, use_ema, folder / "direct")
    batch = {"image": load_images(files, eval_transform(config.data)), "label": torch.zeros(3, dtype=torch.long),
             "key": [str(path) for path in files]}
    expected = direct_probabilities(model, config, [batch])
    rows = read_rows(out)
    assert [row["file"] for row in rows] == [str(path) for path in files]
    worst = max(abs(float(row[f"prob_{c}"]) - expected[row["file"]][c]) for row in rows for c in range(CLASSES))
    assert worst < 1e-6
    return rows


def test_predict_without_ema_matches_the_raw_weights(imported, authors_states, tmp_path):
    predict_and_compare(imported, lesion_files(tmp_path), authors_states, False, tmp_path, "--no-ema")


def test_eval_and_predict_follow_the_configs_choice_of_weights(authors_states, small_shards, tmp_path):
    """eval.use_ema: false (the reference configs: the authors' test loop evaluates the raw weights) holds for
    `diffmic eval` and `predict` unless --ema asks otherwise, as it does for validation during training."""
    ckpt, aux = save_pair(tmp_path / "pair", authors_states["denoiser"], authors_states["dcg"], authors_states["ema"])
    run = tmp_path / "run"
    result = diffmic_here(import_args(ckpt, aux, run, "--shards", str(small_shards), "--set", "eval.use_ema=false"))
    assert result.returncode == 0, result.stderr
    files = lesion_files(tmp_path)
    (tmp_path / "config").mkdir()
    (tmp_path / "asked").mkdir()
    raw = predict_and_compare(run, files, authors_states, False, tmp_path / "config")  # the config's: raw weights
    ema = predict_and_compare(run, files, authors_states, True, tmp_path / "asked", "--ema")
    assert raw != ema  # the two sets of weights predict differently, so the comparison above can tell them apart
    out = tmp_path / "eval"
    result = diffmic_here(["eval", "--run", str(run), "--out", str(out), "--no-progress"])
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "metrics.json").read_text())["ema"] is False


# --- refusals: one line, exit 2, nothing written --------------------------------------------------------
def refused(authors_states, tmp_path, denoiser=None, dcg=None, extra=()) -> str:
    ckpt, aux = save_pair(tmp_path / "bad", denoiser or authors_states["denoiser"], dcg or authors_states["dcg"])
    out = tmp_path / "out"
    result = diffmic_here(import_args(ckpt, aux, out, "--classes", ",".join(map(str, range(CLASSES))), *extra))
    assert result.returncode == 2, result.stdout + result.stderr
    assert not out.exists() and not list(tmp_path.glob(".*importing"))
    message = " ".join(result.stderr.split())
    assert message.startswith("error:") and "Traceback" not in result.stderr
    return message


def test_a_missing_key_is_refused_by_name(authors_states, tmp_path):
    dcg = {name: value for name, value in authors_states["dcg"].items() if name != "mil_attn_V.weight"}
    message = refused(authors_states, tmp_path, dcg=dcg)
    assert "--aux-ckpt (DCG): 1 missing" in message and "mil.value.weight" in message


def test_an_extra_key_is_refused_by_name(authors_states, tmp_path):
    denoiser = {**authors_states["denoiser"], "lin5.lin.weight": torch.zeros(3, 3)}
    message = refused(authors_states, tmp_path, denoiser=denoiser)
    assert "--ckpt (denoiser): 1 unexpected lin5.lin.weight" in message


def test_a_wrong_shape_is_refused_by_name(authors_states, tmp_path):
    denoiser = {**authors_states["denoiser"], "lin4.weight": torch.zeros(CLASSES, 32)}
    message = refused(authors_states, tmp_path, denoiser=denoiser)
    assert "--ckpt (denoiser): 1 of the wrong shape lin4.weight (10, 32) -> output.weight (10, 64)" in message


def test_a_config_of_another_width_is_refused(authors_states, tmp_path):
    message = refused(authors_states, tmp_path, extra=("--set", "model.denoiser.feature_dim=32"))
    assert "28 of the wrong shape" in message and "feature_dim" in message


class NotAWeight:
    """Any object a weights-only load must not build."""


def test_a_pickle_that_is_not_weights_only_is_refused(authors_states, tmp_path):
    ckpt, aux = save_pair(tmp_path / "bad", authors_states["denoiser"], authors_states["dcg"])
    torch.save([authors_states["dcg"], NotAWeight()], aux)
    out = tmp_path / "out"
    result = diffmic_here(import_args(ckpt, aux, out, "--classes", ",".join(map(str, range(CLASSES)))))
    assert result.returncode == 2 and not out.exists()
    message = " ".join(result.stderr.split())
    assert "builds test_import_reference.NotAWeight" in message and "weights_only=True" in message


@pytest.mark.parametrize("content", [b"not a checkpoint\n", b"PK\x03\x04" + b"\0" * 60, b"\x80\x02}q\x00."],
                         ids=["text", "a broken zip", "a pickled dict"])
def test_a_file_that_is_not_a_checkpoint_is_one_line_naming_it(content, authors_states, tmp_path):
    ckpt, aux = save_pair(tmp_path / "pair", authors_states["denoiser"], authors_states["dcg"])
    ckpt.write_bytes(content)
    out = tmp_path / "out"
    result = diffmic_here(import_args(ckpt, aux, out))
    assert result.returncode == 2 and "Traceback" not in result.stderr and not out.exists(), result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert f"refusing --ckpt {ckpt}" in " ".join(result.stderr.split())


def test_an_existing_folder_is_never_overwritten(authors_states, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    ckpt, aux = save_pair(tmp_path / "pair", authors_states["denoiser"], authors_states["dcg"])
    result = diffmic_here(import_args(ckpt, aux, tmp_path / "out"))
    assert result.returncode == 2 and "not empty" in result.stderr
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


# --- train fine-tunes it ------------------------------------------------------------------------------
def test_train_fine_tunes_the_import(imported, small_shards, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(imported, run)
    args = ["train", "--config", str(CONFIG), "--shards", str(small_shards), "--run-dir", str(run), "--no-progress"]
    for setting in SETTINGS + ["train.batch_size=10", "train.dcg_warmup_epochs=0", "train.max_steps=1",
                               "train.val_every=0", "train.mixed_precision=no", "diffusion.noise_draws=1"]:
        args += ["--set", setting]
    result = diffmic_here(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fine-tuning from the weights and EMA of" in " ".join(result.stderr.split())
    tuned = find_checkpoint(run, "last")
    assert tuned.step == 778 and tuned.has_training_state
