import itertools

import pytest
import torch
from torchvision import models

from diffmic.config import EvalConfig, config_from_dict, load_config
from diffmic.errors import PretrainedWeightsError
from diffmic.models import DCG, Denoiser, DiffMIC, crop_tiles, select_roi_cells, top_t_pool
from diffmic.models.backbones import ResNetTrunk

SMALL = {"data": {"num_classes": 3, "image_size": 64},
         "model": {"dcg": {"backbone": "resnet18", "local_backbone": "resnet18", "k": 3},
                   "denoiser": {"feature_dim": 32}},
         "eval": {"steps": 20}}


def small_config(**sections):
    values = {key: dict(value) for key, value in SMALL.items()}
    for key, value in sections.items():
        values.setdefault(key, {}).update(value)
    return config_from_dict(values)


def brute_force_roi(saliency: torch.Tensor, k: int) -> list[list[int]]:
    """Reference: normalise each class map in Python, sum, pick greedily with row-major ties."""
    chosen = []
    for maps in saliency.tolist():
        cells = len(maps[0]) * len(maps[0][0])
        score = [0.0] * cells
        for class_map in maps:
            flat = list(itertools.chain(*class_map))
            low, high = min(flat), max(flat)
            for i, v in enumerate(flat):
                score[i] += (v - low) / (high - low) if high > low else 0.0
        order = sorted(range(cells), key=lambda i: (-score[i], i))
        chosen.append(order[:k])
    return chosen


@pytest.mark.parametrize("seed", range(5))
def test_roi_top_k_matches_brute_force_on_random_maps(seed):
    g = torch.Generator().manual_seed(seed)
    saliency = torch.randn(4, 3, 7, 7, generator=g, dtype=torch.float64)
    assert select_roi_cells(saliency, 6).tolist() == brute_force_roi(saliency, 6)


def test_roi_top_k_breaks_ties_in_row_major_order_and_survives_constant_maps():
    g = torch.Generator().manual_seed(0)
    # Quantised values force many ties; one class map is constant (no division by zero).
    saliency = torch.randint(0, 3, (5, 4, 7, 7), generator=g).double()
    saliency[:, 2] = 5.0
    saliency[1] = 1.0  # an image whose every map is constant: the first K cells win
    picked = select_roi_cells(saliency, 6)
    assert picked.tolist() == brute_force_roi(saliency, 6)
    assert picked[1].tolist() == [0, 1, 2, 3, 4, 5]


def test_roi_rejects_k_larger_than_the_map():
    with pytest.raises(ValueError, match="4 cells"):
        select_roi_cells(torch.randn(1, 2, 2, 2), 5)


@pytest.mark.parametrize("channels", ["all", "first"])
def test_crop_gather_equals_plain_slicing_for_every_tile(channels):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 224, 224, generator=g)
    cells = torch.stack([torch.randperm(49, generator=g)[:6] for _ in range(3)])
    tiles = crop_tiles(images, cells, channels)
    assert tiles.shape == (3, 6, 3, 32, 32)
    for b, k in itertools.product(range(3), range(6)):
        row, col = divmod(int(cells[b, k]), 7)
        expected = images[b, :, 32 * row:32 * row + 32, 32 * col:32 * col + 32]
        if channels == "first":
            expected = expected[:1].expand(3, -1, -1)
        assert torch.equal(tiles[b, k], expected)


def test_top_t_pooling():
    saliency = torch.arange(8.0).view(1, 2, 2, 2)
    torch.testing.assert_close(top_t_pool(saliency, 1.0), torch.tensor([[1.5, 5.5]]))
    torch.testing.assert_close(top_t_pool(saliency, 0.5), torch.tensor([[2.5, 6.5]]))


@pytest.mark.parametrize("size, k", [(224, 6), (64, 3)])
def test_dcg_output_shapes_and_attention_sums_to_one(size, k):
    dcg = DCG(5, "resnet18", "resnet18", k=k).eval()
    out = dcg(torch.randn(2, 3, size, size))
    cells = size // 32
    assert out.fused.shape == out.global_.shape == out.local.shape == (2, 5)
    assert out.saliency.shape == (2, 5, cells, cells) and out.roi_cells.shape == (2, k)
    torch.testing.assert_close(out.attention.sum(dim=1), torch.ones(2))
    torch.testing.assert_close(out.fused, (out.global_ + out.local) / 2)


def test_denoiser_shapes_and_per_timestep_gains():
    denoiser = Denoiser(4, feature_dim=16, timesteps=10).eval()
    features = denoiser.encode(torch.randn(3, 3, 64, 64))
    assert features.shape == (3, 16)
    out = denoiser(features, torch.randn(3, 4), torch.softmax(torch.randn(3, 4), -1), torch.tensor([1, 5, 10]))
    assert out.shape == (3, 4)
    gains = denoiser.layer1.gain.weight
    assert gains.shape == (11, 16) and 0 <= gains.min() and gains.max() < 1


@pytest.mark.parametrize("variant", ["full", "c2", "c1", "basic"])
def test_every_variant_trains_and_predicts(variant):
    torch.manual_seed(0)
    model = DiffMIC(small_config(model={"variant": variant}))
    batch = {"image": torch.randn(4, 3, 64, 64), "label": torch.tensor([0, 1, 2, 1]), "key": list("abcd")}
    losses = model(batch)
    assert torch.isfinite(losses["loss"])
    assert ("mmd" in losses) == (variant == "full") and ("mse" in losses) == (variant != "basic")
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.dcg.parameters() if p.requires_grad)
    prediction = model.predict(batch["image"], EvalConfig(sampler="respaced", steps=5, n_samples=2))
    assert prediction.probs.shape == (4, 3) and prediction.label.shape == (4,)
    torch.testing.assert_close(prediction.probs.sum(dim=1), torch.ones(4))
    assert prediction.dcg_probs.shape == (4, 3)
    assert (prediction.y0 is None) == (variant == "basic") and (prediction.spread is None) == (variant == "basic")


def test_checkpoints_naming_the_guidance_network_guide_still_load():
    """Weights saved before the guidance network was called `dcg` in code (as in configs and outputs)."""
    torch.manual_seed(0)
    saved = DiffMIC(small_config()).state_dict()
    old = {name.replace("dcg.", "guide.", 1) if name.startswith("dcg.") else name: value
           for name, value in saved.items()}
    assert any(name.startswith("guide.") for name in old)
    model = DiffMIC(small_config())
    model.load_state_dict(old)  # strict: every key found under its new name
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[name])


def test_denoiser_loss_does_not_reach_the_guidance_model():
    model = DiffMIC(small_config())
    batch = {"image": torch.randn(4, 3, 64, 64), "label": torch.tensor([0, 1, 2, 1])}
    model(batch, train_dcg=False)["loss"].backward()
    assert all(p.grad is None for p in model.dcg.parameters())
    assert all(p.grad is not None for p in model.denoiser.parameters())


def test_guidance_priors_come_from_eval_mode_and_restore_the_mode():
    model = DiffMIC(small_config()).train()
    modes = []
    model.dcg.register_forward_hook(lambda m, i, o: modes.append(m.training))
    model({"image": torch.randn(4, 3, 64, 64), "label": torch.tensor([0, 1, 2, 1])})
    assert modes == [False, True]  # frozen priors, then the cross-entropy pass
    assert model.dcg.training


def test_predict_runs_the_encoder_and_guidance_once_per_batch_at_1000_steps():
    model = DiffMIC(small_config(eval={"steps": 1000}))
    calls = {"encoder": 0, "dcg": 0, "mlp": 0}
    model.denoiser.encoder.register_forward_hook(lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1))
    model.dcg.register_forward_hook(lambda *a: calls.__setitem__("dcg", calls["dcg"] + 1))
    model.denoiser.output.register_forward_hook(lambda *a: calls.__setitem__("mlp", calls["mlp"] + 1))
    model.predict(torch.randn(2, 3, 64, 64), EvalConfig(sampler="respaced", steps=1000, n_samples=3))
    assert calls == {"encoder": 1, "dcg": 1, "mlp": 1000}


def test_predict_with_fixed_noise_is_reproducible_and_restores_train_mode():
    model = DiffMIC(small_config()).train()
    images = torch.randn(3, 3, 64, 64)
    noise = torch.randn(11, 6, 3)
    sampling = EvalConfig(sampler="respaced", steps=10, n_samples=2)
    first = model.predict(images, sampling, noise=noise)
    second = model.predict(images, sampling, noise=noise)
    torch.testing.assert_close(first.y0, second.y0)
    assert model.training


@pytest.mark.parametrize("images, labels, message", [
    (torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), r"shape \(B, 3, 64, 64\)"),
    (torch.randn(2, 1, 64, 64), torch.tensor([0, 1]), r"shape \(B, 3, 64, 64\)"),
    (torch.randn(2, 3, 64, 64), torch.tensor([0, 1, 2]), r"shape \(2,\)"),
    (torch.randn(2, 3, 64, 64), torch.tensor([0, 7]), r"0\.\.2"),
    (torch.randn(2, 3, 64, 64), torch.tensor([0.0, 1.0]), "integer tensor"),
    (torch.full((2, 3, 64, 64), float("nan")), torch.tensor([0, 1]), "NaN"),
])
def test_bad_batches_raise_value_errors_naming_the_expectation(images, labels, message):
    model = DiffMIC(small_config())
    with pytest.raises(ValueError, match=message):
        model({"image": images, "label": labels})


def test_paper_config_parameter_counts_match_the_authors_model():
    model = DiffMIC(load_config("configs/ham10000.yaml"))
    dcg = sum(p.numel() for p in model.dcg.parameters())
    denoiser = sum(p.numel() for p in model.denoiser.parameters())
    assert dcg == pytest.approx(47.6e6, rel=0.01)
    assert denoiser == pytest.approx(108.5e6, rel=0.01)


def test_pretrained_weights_load_from_a_local_file_only(tmp_path):
    source = models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    trunk = ResNetTrunk("resnet18", str(path))
    assert torch.equal(trunk.stem[0].weight, source.conv1.weight)
    with pytest.raises(PretrainedWeightsError, match="do not exist"):
        ResNetTrunk("resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(PretrainedWeightsError, match="does not hold resnet50"):
        ResNetTrunk("resnet50", str(path))
