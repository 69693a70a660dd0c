"""The evaluation settings of one run, resolved once: the run's `eval` config (diffmic.config.EvalConfig, where
every setting is declared) with the command line's choices on top, checked before any image is read. The
evaluator, `predict`, sweeps and the trainer's validator all sample with the resolved EvalConfig, passed whole."""

from __future__ import annotations

from dataclasses import fields, replace

from ..config import Config, ConfigError, EvalConfig
from ..errors import EvalSettingsError


def resolve_eval_settings(config: Config, **choices) -> EvalConfig:
    """`config.eval` with `choices` (EvalConfig fields) on top, where a choice is not None: None means unset, the
    config's; a 0 the user typed is an error to report, not a request for the default. `config` is the run's,
    since the steps a chain may take are its diffusion.timesteps. A refused choice names its flag."""
    chosen = {name: value for name, value in choices.items() if value is not None}
    try:
        return replace(config, eval=replace(config.eval, **chosen)).eval  # Config checks eval.steps too
    except ConfigError as error:
        raise EvalSettingsError(f"{option_name(error.key)}: {error.detail}") from None


def option_name(key: str) -> str:
    """The flag of an eval setting's key ("steps" or "eval.steps" -> "--steps"); eval.KEY where it has none."""
    name = key.removeprefix("eval.")
    declared = {field.name: field.metadata.get("flag") for field in fields(EvalConfig)}
    flag = declared.get(name)
    return flag.split("/")[0] if flag else f"eval.{name}"
