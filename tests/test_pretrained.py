"""Starting weights: `imagenet` reads torchvision's weights from the torch hub cache (never a download in these
tests), a path reads that file, '' keeps random init; a missing file is one message before any work."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch

from diffmic.config import load_config
from diffmic.errors import PretrainedWeightsError
from diffmic.models.backbones import ResNetTrunk
from diffmic.models.pretrained import imagenet_file, requested_weights
from engine_helpers import REPO, TINY, diffmic_here
from pretrained_helpers import place_imagenet_file

DIGITS = str(REPO / "configs" / "digits.yaml")
# digits' model with both DCG trunks from ImageNet: what the paper configs ask, at the tests' size.
DIGITS_FROM_IMAGENET = ["model.dcg.pretrained=imagenet"]


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache of this test's own, offline."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("DIFFMIC_OFFLINE", "1")
    return home


def test_imagenet_is_read_from_where_torchvisions_weights_api_caches_it(torch_home):
    path, state = place_imagenet_file(torch_home, "resnet18", seed=3)
    assert imagenet_file("resnet18") == path
    trunk = ResNetTrunk("resnet18", "imagenet")
    assert torch.equal(trunk.stem[0].weight, state["conv1.weight"])
    assert torch.equal(trunk.layers[3][1].bn2.running_var, state["layer4.1.bn2.running_var"])
    random = ResNetTrunk("resnet18", "")
    assert not torch.equal(random.stem[0].weight, state["conv1.weight"])


def test_a_missing_imagenet_file_offline_names_the_file_the_place_and_the_url(torch_home):
    with pytest.raises(PretrainedWeightsError) as raised:
        ResNetTrunk("resnet50", "imagenet")
    message = str(raised.value)
    expected = torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    for part in (str(expected), "https://download.pytorch.org/models/resnet50-0676ba61.pth", "diffmic weights fetch",
                 "DIFFMIC_OFFLINE"):
        assert part in message


def test_a_failed_download_says_so_and_where_the_file_goes(torch_home, monkeypatch):
    from torchvision.models import ResNet18_Weights

    monkeypatch.delenv("DIFFMIC_OFFLINE")
    attempts = []

    def no_network(self, *args, **kwargs):
        attempts.append((self, kwargs.get("check_hash")))
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", no_network)
    with pytest.raises(PretrainedWeightsError, match="the download failed: <urlopen error Temporary failure"):
        ResNetTrunk("resnet18", "imagenet")
    assert attempts == [(ResNet18_Weights.IMAGENET1K_V1, True)]  # torchvision's API, with its hash check


def test_a_file_of_another_architecture_is_refused_by_name(torch_home):
    path, _ = place_imagenet_file(torch_home, "resnet18")
    path.rename(imagenet_file("resnet50"))
    with pytest.raises(PretrainedWeightsError, match=f"{imagenet_file('resnet50')} does not hold resnet50"):
        ResNetTrunk("resnet50", "imagenet")


def test_the_paper_configs_start_the_dcg_and_the_classifier_from_imagenet_and_the_encoder_at_random():
    for name in ("ham10000", "aptos2019", "pmg2000", "reference/ham10000", "reference/aptos2019"):
        requests = requested_weights(load_config(REPO / "configs" / f"{name}.yaml"))
        assert [(r.trunk, r.arch, r.source) for r in requests] == [
            ("DCG global trunk", "resnet50", "imagenet"), ("DCG local trunk", "resnet50", "imagenet")], name
    for variant, trunk in (("basic", "classifier trunk"), ("c1", "classifier trunk"), ("c2", "DCG global trunk")):
        requests = requested_weights(load_config(REPO / "configs" / "ablations" / f"ham10000-{variant}.yaml"))
        assert requests[0].trunk == trunk and requests[0].source == "imagenet"
    assert requested_weights(load_config(DIGITS)) == []


def test_weights_list_and_fetch_say_what_is_cached(torch_home):
    listed = diffmic_here(["weights", "list", "--config", DIGITS, "--set", *DIGITS_FROM_IMAGENET])
    assert listed.returncode == 0 and "no" in listed.stdout and "resnet18-f37072fd.pth" in listed.stdout
    fetched = diffmic_here(["weights", "fetch", "--config", DIGITS, "--set", *DIGITS_FROM_IMAGENET])
    assert fetched.returncode == 2 and str(imagenet_file("resnet18")) in fetched.stderr
    place_imagenet_file(torch_home, "resnet18")
    fetched = diffmic_here(["weights", "fetch", "--config", DIGITS, "--set", *DIGITS_FROM_IMAGENET])
    assert fetched.returncode == 0 and f"ready: {imagenet_file('resnet18')}" in fetched.stdout
    listed = diffmic_here(["weights", "list", "--config", DIGITS, "--set", *DIGITS_FROM_IMAGENET])
    assert "yes" in listed.stdout


def _train(tmp_path: Path, shards: Path, *extra: str, slurm: tuple[str, ...] = ()):
    overrides = [*TINY, *DIGITS_FROM_IMAGENET, "train.max_steps=1", "train.dcg_warmup_epochs=0",
                 "train.val_every=0", *extra]
    return diffmic_here(["train", "--config", DIGITS, "--shards", str(shards), "--no-progress", *slurm,
                         *[item for override in overrides for item in ("--set", override)]], cwd=tmp_path)


def test_training_offline_without_the_file_stops_before_writing_anything(torch_home, digits_shards, tmp_path):
    result = _train(tmp_path, digits_shards)
    assert result.returncode == 2 and str(imagenet_file("resnet18")) in result.stderr
    assert not (tmp_path / "runs").exists()
    dry_run = _train(tmp_path, digits_shards, slurm=("--slurm", "--dry-run"))  # never submitted to fail in a queue
    assert dry_run.returncode == 2 and str(imagenet_file("resnet18")) in dry_run.stderr
    assert not (tmp_path / "runs").exists()


def test_training_says_its_dcg_trunks_start_from_imagenet(torch_home, digits_shards, tmp_path):
    path, _ = place_imagenet_file(torch_home, "resnet18")
    result = _train(tmp_path, digits_shards)
    assert result.returncode == 0, result.stderr[-2000:]
    said = " ".join(result.stderr.split())
    for trunk in ("DCG global trunk", "DCG local trunk"):
        assert f"{trunk} starts from ImageNet weights (resnet18 ResNet18_Weights.IMAGENET1K_V1) in {path}" in said
