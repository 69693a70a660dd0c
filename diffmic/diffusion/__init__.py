"""Pure diffusion maths: the noise schedule, the samplers, MMD, and the rules that turn the chains' final
states into probabilities. Imports nothing else of diffmic (the config reads its names).

Names are imported on first use, so the config can read `sampler.SAMPLERS` without importing torch. (No
submodule shares a name with what it exports: importing it would replace that name on this package.)
"""

from __future__ import annotations

import importlib

_HOMES = {"mmd": "discrepancy", "SAMPLERS": "sampler", "sample": "sampler", "sampling_schedule": "sampler",
          "NoiseSchedule": "schedule", "antithetic_timesteps": "schedule", "PROBABILITY_RULES": "probability",
          "chain_probabilities": "probability"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
