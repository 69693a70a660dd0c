"""Evaluation settings are declared once (diffmic.config.EvalConfig): the eval and predict options are generated
from that declaration, and an option left unset is the run's own value."""

from __future__ import annotations

from dataclasses import dataclass, fields

import click
import pytest
import typer

from diffmic.cli import app
from diffmic.cli.common import field_options
from diffmic.config import EvalConfig, flag, load_config
from diffmic.errors import EvalSettingsError
from diffmic.evaluation.settings import resolve_eval_settings
from engine_helpers import REPO

FLAGGED = [field for field in fields(EvalConfig) if "flag" in field.metadata]


def options_of(command: str) -> dict[str, click.Option]:
    group = typer.main.get_command(app)
    return {name: parameter for parameter in group.commands[command].params for name in parameter.opts}


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_every_flagged_setting_is_an_option_that_defaults_to_unset(command):
    options = options_of(command)
    assert {field.name for field in FLAGGED} >= {"sampler", "steps", "n_samples", "use_ema", "precision", "compile"}
    for field in FLAGGED:
        option = options[field.metadata["flag"].split("/")[0]]
        assert option.name == field.name and option.default is None, field.name
        assert f"Default: the run's eval.{field.name}." in option.help


def test_a_new_flagged_field_becomes_an_option_of_its_own():
    @dataclass
    class Settings:
        uncertainty: str = flag("disagreement", "--uncertainty", "Which measure flags an image.")
        quiet: int = 3  # no flag: not an option

    (option,) = field_options(Settings, unset="Default: the run's eval.{name}.")
    assert option.name == "uncertainty" and option.annotation is str
    assert option.default.default is None and option.default.param_decls == ("--uncertainty",)


def test_unset_choices_are_the_configs_and_set_ones_win():
    config = load_config(REPO / "configs" / "reference" / "ham10000.yaml")
    assert resolve_eval_settings(config, use_ema=None, steps=None) == config.eval
    assert config.eval.use_ema is False and resolve_eval_settings(config).use_ema is False
    chosen = resolve_eval_settings(config, use_ema=True, steps=10, sampler="ddim")
    assert (chosen.use_ema, chosen.steps, chosen.sampler, chosen.precision) == (True, 10, "ddim", config.eval.precision)


@pytest.mark.parametrize("choice, message", [
    ({"steps": 0}, "--steps: got 0, expected at least 1"),
    ({"steps": 1001}, "--steps: got 1001, expected at most diffusion.timesteps (1000)"),
    ({"n_samples": -1}, "--n-samples: got -1, expected at least 1"),
    ({"sampler": "bogus"}, "--sampler: got 'bogus', expected one of 'respaced', 'truncated', 'ddim'"),
    ({"use_ema": "yes"}, "--ema: got 'yes', expected true or false"),
])
def test_a_refused_choice_names_its_flag(choice, message):
    with pytest.raises(EvalSettingsError) as error:
        resolve_eval_settings(load_config(REPO / "configs" / "digits.yaml"), **choice)
    assert str(error.value) == message
