"""The evaluation settings of one run, resolved once: the run's `eval` config with the command line's choices
on top, checked before any image is read. The evaluator, `predict` and the trainer's validator all build them
here; the model and the sampler receive the sampling part whole."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PRECISIONS, Config
from ..diffusion.sampler import SAMPLERS, SamplingSettings
from ..errors import EvalSettingsError


@dataclass(frozen=True)
class EvalSettings:
    sampling: SamplingSettings
    use_ema: bool  # the denoiser's EMA weights instead of its raw ones
    batch_size: int  # images per batch on each process
    precision: str = "auto"  # "auto", "fp32" or "bf16" as asked; diffmic.accelerator.inference_precision decides
    compile: bool = False  # one compiled reverse step (DiffMIC.compile_sampling)

    @classmethod
    def from_dict(cls, values: dict) -> "EvalSettings":
        """The inverse of `dataclasses.asdict` (how the settings travel to local worker processes as JSON)."""
        return cls(SamplingSettings(**values["sampling"]), values["use_ema"], values["batch_size"],
                   values.get("precision", "auto"), values.get("compile", False))


def resolve_eval_settings(config: Config, steps: int | None = None, sampler: str | None = None,
                          n_samples: int | None = None, use_ema: bool | None = None,
                          precision: str | None = None, compile: bool | None = None) -> EvalSettings:
    """`config.eval` where a choice is None (only None: a 0 the user typed is an error to report, not a request
    for the default). `config` is the run's, since the steps a chain may take are its diffusion.timesteps."""
    defaults = config.eval
    steps = defaults.steps if steps is None else steps
    sampler = defaults.sampler if sampler is None else sampler
    n_samples = defaults.n_samples if n_samples is None else n_samples
    timesteps = config.diffusion.timesteps
    if not 1 <= steps <= timesteps:
        raise EvalSettingsError(f"--steps must be in 1..{timesteps} (the model's diffusion.timesteps), not {steps}")
    if sampler not in SAMPLERS:
        raise EvalSettingsError(f"--sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")
    if n_samples < 1:
        raise EvalSettingsError(f"--n-samples must be at least 1 (chains per image), not {n_samples}")
    precision = defaults.precision if precision is None else precision
    if precision not in PRECISIONS:
        raise EvalSettingsError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return EvalSettings(SamplingSettings(sampler, steps, n_samples, defaults.aggregate, defaults.probability),
                        defaults.use_ema if use_ema is None else use_ema, defaults.batch_size, precision,
                        defaults.compile if compile is None else compile)
