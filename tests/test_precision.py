"""Inference precision (`eval.precision`, `--precision`): auto picks bf16 only where the device has it natively."""

from __future__ import annotations

import json
import warnings

import pytest

from diffmic import accelerator
from diffmic.config import load_config
from diffmic.errors import EvalSettingsError
from diffmic.evaluation.settings import resolve_eval_settings
from engine_helpers import diffmic_here, digits_shards, tiny_run  # noqa: F401


def cpu_only(monkeypatch, native_bf16: bool) -> None:
    monkeypatch.setattr(accelerator.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(accelerator, "cpu_has_native_bf16", lambda: native_bf16)


@pytest.mark.parametrize("native, requested, expected", [
    (True, "auto", "bf16"), (False, "auto", "no"), (True, "fp32", "no"), (True, "bf16", "bf16"),
])
def test_auto_means_bf16_only_where_the_cpu_has_it(monkeypatch, native, requested, expected):
    cpu_only(monkeypatch, native)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these is worth a warning
        assert accelerator.inference_precision(requested) == expected


def test_bf16_asked_for_without_native_support_runs_fp32_and_says_so(monkeypatch):
    cpu_only(monkeypatch, False)
    with pytest.warns(UserWarning, match="no native bf16"):
        assert accelerator.inference_precision("bf16") == "no"


def test_the_setting_comes_from_the_config_unless_the_command_line_gives_one():
    config = load_config("configs/digits.yaml")
    assert resolve_eval_settings(config).precision == config.eval.precision == "auto"
    assert resolve_eval_settings(config, precision="fp32").precision == "fp32"
    with pytest.raises(EvalSettingsError, match="--precision: got 'fp16', expected one of 'auto', 'fp32', 'bf16'"):
        resolve_eval_settings(config, precision="fp16")


def test_eval_records_the_precision_it_ran_in(tiny_run, tmp_path):
    from diffmic.hardware import cpu_has_native_bf16

    for requested in ("fp32", "bf16"):
        out = tmp_path / requested
        result = diffmic_here(["eval", "--run", str(tiny_run), "--checkpoint", "last", "--precision", requested,
                               "--out", str(out), "--no-progress"])
        assert result.returncode == 0, result.stdout + result.stderr
        ran = json.loads((out / "metrics.json").read_text())["precision"]
        assert ran == ("bf16" if requested == "bf16" and cpu_has_native_bf16() else "fp32")
