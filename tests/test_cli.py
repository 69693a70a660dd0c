"""The command line as a user meets it: help with examples, the same option names for the same things,
and usage mistakes answered with a message instead of a traceback."""

from __future__ import annotations

import pytest

from engine_helpers import diffmic_here

COMMANDS = ["shard", "verify", "info", "train", "eval", "predict", "import-reference", "status", "report", "sweep",
            "compare", "model-summary", "configs", "weights"]  # --help order
# The same thing has the same name everywhere.
SHARED_OPTIONS = {
    "--run": ["eval", "predict", "status", "report"],
    "--config": ["train", "model-summary", "weights list", "weights fetch"],
    "--dataset": ["shard", "train", "model-summary", "weights list", "weights fetch"],
    "--set": ["train", "model-summary", "weights list", "weights fetch"],
    "--shards": ["train", "eval"],
    "--out": ["shard", "eval", "predict"],
    "--checkpoint": ["eval", "predict"],
    "--steps": ["eval", "predict"],
    "--sampler": ["eval", "predict"],
    "--n-samples": ["eval", "predict"],
    "--slurm": ["train", "eval"],
    "--progress": ["train", "eval"],
}


def help_text(command: str) -> str:
    result = diffmic_here([*command.split(), "--help"])
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_top_level_help_lists_the_commands_in_the_order_of_the_users_path():
    text = diffmic_here(["--help"]).stdout
    commands_panel = text[text.index("Commands"):]
    positions = [commands_panel.index(f" {command} ") for command in COMMANDS]
    assert positions == sorted(positions)
    assert "diffmic shard --dataset ham10000" in text and "diffmic eval --run" in text


@pytest.mark.parametrize("command", [*COMMANDS, "weights list", "weights fetch"])
def test_every_command_has_help_with_an_example(command):
    text = help_text(command)
    assert "Example" in text and f"diffmic {command}" in text
    for option, commands in SHARED_OPTIONS.items():
        if command in commands:
            assert option in text, f"diffmic {command} lacks {option}"


@pytest.mark.parametrize("args, message", [
    (["train", "--set", "train.lr=1", "train.epochs=2"], "unexpected extra argument"),
    (["eval", "--run", "runs/x", "--nope"], "No such option: --nope"),
    (["status"], "give the run folder once"),
    (["report"], "give the run folder once"),
    (["model-summary"], "--config FILE or --dataset NAME"),
])
def test_usage_mistakes_get_a_message_and_exit_2(args, message):
    result = diffmic_here(args)
    assert result.returncode == 2
    assert message in result.stdout + result.stderr and "Traceback" not in result.stderr
