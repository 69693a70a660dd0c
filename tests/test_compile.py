"""eval.compile / --compile: one compiled reverse step gives the chains eager gives, compiled once per batch shape."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from diffmic.config import config_from_dict
from diffmic.evaluation.settings import resolve_eval_settings
from diffmic.models import DiffMIC
from engine_helpers import diffmic_here, digits_shards, tiny_run  # noqa: F401

SMALL = {"data": {"num_classes": 3, "image_size": 64},
         "model": {"dcg": {"backbone": "resnet18", "local_backbone": "resnet18", "k": 1},
                   "denoiser": {"feature_dim": 32}},
         "eval": {"steps": 20, "n_samples": 2}}


def eager_and_compiled(model: DiffMIC, images: torch.Tensor, sampling, bf16: bool):
    noise = torch.randn(sampling.steps + 1, images.shape[0] * sampling.n_samples, model.num_classes,
                        generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model.compiled_step = None
        eager = model.predict(images, sampling, noise=noise, record_every=5)
        model.compile_sampling(torch.device("cpu"))
        compiled = model.predict(images, sampling, noise=noise, record_every=5)
    return eager, compiled


@pytest.mark.parametrize("sampler", ["respaced", "ddim"])
def test_a_compiled_chain_ends_where_the_eager_one_does(sampler):
    config = config_from_dict(SMALL)
    torch.manual_seed(0)
    model = DiffMIC(config).eval()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    sampling = resolve_eval_settings(config, sampler=sampler)
    eager, compiled = eager_and_compiled(model, images, sampling, bf16=False)
    scale = eager.y0.abs().max()
    torch.testing.assert_close(compiled.y0, eager.y0, rtol=0, atol=1e-5 * scale)
    assert torch.equal(compiled.label, eager.label)
    assert [t for t, _ in compiled.trajectory] == [t for t, _ in eager.trajectory]
    # The recorded states are copies, not one buffer that the next step overwrites.
    states = torch.stack([y for _, y in compiled.trajectory])
    assert len({tuple(s.flatten().tolist()) for s in states}) == len(states)


def test_a_compiled_bf16_chain_agrees_within_bf16_tolerance():
    config = config_from_dict(SMALL)
    torch.manual_seed(0)
    model = DiffMIC(config).eval()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    eager, compiled = eager_and_compiled(model, images, resolve_eval_settings(config), bf16=True)
    torch.testing.assert_close(compiled.probs, eager.probs, rtol=0, atol=2e-2)
    torch.testing.assert_close(compiled.y0, eager.y0, rtol=2e-2, atol=2e-2 * eager.y0.abs().max())


def test_the_step_compiles_once_per_batch_shape_not_per_step_or_batch():
    from torch._dynamo.utils import counters

    config = config_from_dict(SMALL)
    model = DiffMIC(config).eval()
    model.compile_sampling(torch.device("cpu"))
    sampling = resolve_eval_settings(config)
    torch._dynamo.reset()
    counters.clear()
    for batch in (2, 2, 2, 1):  # two batches of one shape, then a smaller last batch
        model.predict(torch.randn(batch, 3, 64, 64), sampling)
    assert counters["stats"]["unique_graphs"] == 2


def test_the_setting_comes_from_the_config_unless_the_command_line_gives_one():
    config = config_from_dict(SMALL)
    assert resolve_eval_settings(config).compile is False
    assert resolve_eval_settings(config, compile=True).compile is True
    on = config_from_dict({**SMALL, "eval": {**SMALL["eval"], "compile": True}})
    assert resolve_eval_settings(on).compile is True
    assert resolve_eval_settings(on, compile=False).compile is False


def test_compile_without_a_cpp_compiler_is_one_message_before_any_image(tiny_run, monkeypatch):
    from diffmic import hardware

    monkeypatch.setattr(hardware, "cpp_compiler", lambda: None)
    result = diffmic_here(["eval", "--run", str(tiny_run), "--checkpoint", "last", "--compile", "--no-progress"])
    assert result.returncode != 0
    assert "needs a C++ compiler" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_the_cpp_compiler_is_found_where_torch_compile_looks():
    import torch._inductor.config as inductor
    from torch._inductor.cpp_builder import cpp_compiler_search

    from diffmic import hardware

    assert hardware.cpp_compiler() is not None  # g++ is on every machine the suite runs on
    cpp_compiler_search.cache_clear()
    try:
        with inductor.patch({"cpp.cxx": (None, "/nonexistent/c++")}):
            assert hardware.cpp_compiler() is None
    finally:
        cpp_compiler_search.cache_clear()


def read_predictions(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_eval_with_compile_writes_the_predictions_eager_writes(tiny_run, tmp_path):
    outputs = {}
    for flag in ("--no-compile", "--compile"):
        out = tmp_path / flag
        result = diffmic_here(["eval", "--run", str(tiny_run), "--checkpoint", "last", "--steps", "10",
                               "--precision", "fp32", flag, "--out", str(out), "--no-progress"])
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads((out / "metrics.json").read_text())["compiled"] is (flag == "--compile")
        outputs[flag] = read_predictions(out / "predictions.csv")
    eager, compiled = outputs["--no-compile"], outputs["--compile"]
    assert [row["key"] for row in compiled] == [row["key"] for row in eager]
    assert [row["predicted"] for row in compiled] == [row["predicted"] for row in eager]
    probability_columns = [name for name in eager[0] if name.startswith("prob_")]
    for mine, theirs in zip(compiled, eager):
        for name in probability_columns:
            assert float(mine[name]) == pytest.approx(float(theirs[name]), abs=1e-4)
