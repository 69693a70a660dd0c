"""Native bf16 is detected from the CPU's flags, and training precision follows it."""

from __future__ import annotations

import warnings

import pytest

from diffmic import accelerator, hardware


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_info", lambda: ("EPYC", frozenset({"avx2", "avx512f", "avx512_bf16"})))
    assert hardware.cpu_has_native_bf16()
    monkeypatch.setattr(hardware, "cpu_info", lambda: ("Xeon", frozenset({"avx2", "amx_bf16", "amx_tile"})))
    assert hardware.cpu_has_native_bf16()
    monkeypatch.setattr(hardware, "cpu_info", lambda: ("old", frozenset({"avx2", "avx512f"})))
    assert not hardware.cpu_has_native_bf16()


@pytest.mark.parametrize("native, requested, expected", [(True, "bf16", "bf16"), (False, "bf16", "no"),
                                                          (True, "fp16", "no"), (True, "no", "no")])
def test_a_cpu_trains_in_bf16_only_where_it_has_native_bf16(monkeypatch, native, requested, expected):
    monkeypatch.setattr(accelerator, "cpu_has_native_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert accelerator.resolve_precision(requested, on_gpu=False) == expected
    # Falling back to fp32 is said; doing what was asked is not.
    assert bool(said) == (requested != expected)
