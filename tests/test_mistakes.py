"""The mistakes and accidents of the reliability probe that need no trained run: each ends in one line naming what
is wrong (exit status 2), or in a warning where the result is usable but not what the user may think."""

from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import pytest

from data_fixtures import ham_metadata_layout
from diffmic.config import ConfigError, load_config
from diffmic.errors import RunFileError, RunLockError
from engine_helpers import REPO, diffmic_here

CONFIG = REPO / "configs" / "digits.yaml"


def one_error_line(result, *expected: str) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    message = " ".join(result.stderr.split())  # the line as printed, unfolded
    assert all(part in message for part in expected), message
    return message


# --- settings -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, expected", [
    ("train.lr='0.1", "not plain YAML"),  # an unclosed quote
    ("train.lr=!!python/object/apply:os.system ['touch {marker}']", "not plain YAML"),
    ("train.seed=-1", "expected 0 .. 4294967295"),
    ("train.seed=12345678901234567890", "expected 0 .. 4294967295"),
    ("train.lr=inf", "expected a finite number"),
    ("train.lr=.nan", "expected a finite number"),
])
def test_a_bad_override_is_one_line_and_runs_nothing(override, expected, tmp_path):
    marker = tmp_path / "ran"
    result = diffmic_here(["train", "--config", str(CONFIG), "--shards", str(tmp_path / "none"),
                           "--set", override.format(marker=marker)])
    one_error_line(result, expected)
    assert not marker.exists()


def test_non_finite_numbers_are_refused_wherever_a_number_is_read():
    with pytest.raises(ConfigError, match="train.dcg_lr.*finite"):
        load_config(CONFIG, ["train.dcg_lr=-.inf"])


# --- dataset files ------------------------------------------------------------------------------------------------
def rewrite_csv(path: Path, edit) -> None:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    path.write_text("".join(",".join(row) + "\n" for row in edit(rows)))


def test_an_unclosed_quote_in_the_ham10000_csv_names_its_line(tmp_path):
    ham_metadata_layout(tmp_path / "ham", lesions_per_class=2)
    metadata = tmp_path / "ham" / "HAM10000_metadata.csv"
    rewrite_csv(metadata, lambda rows: [rows[0], rows[1], [f'"{rows[2][0]}', *rows[2][1:]], *rows[3:]])
    result = diffmic_here(["shard", "--dataset", "ham10000", "--root", str(tmp_path / "ham"), "--out",
                           str(tmp_path / "shards"), "--size", "16"])
    one_error_line(result, f"{metadata} line 3", "quote")
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_a_ham10000_csv_without_lesion_id_warns_that_splits_are_per_image(tmp_path):
    from diffmic.data import ShardOptions, ShardWarning, shard_dataset

    ham_metadata_layout(tmp_path / "ham", lesions_per_class=4)
    rewrite_csv(tmp_path / "ham" / "HAM10000_metadata.csv", lambda rows: [row[1:] for row in rows])
    with pytest.warns(ShardWarning, match="no lesion_id .* image by image"):
        shard_dataset(ShardOptions(dataset="ham10000", root=tmp_path / "ham", out=tmp_path / "shards", size=16,
                                   workers=1))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height pixels: its header is all PIL reads before refusing it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_refused_in_one_line_without_decoding_it(tmp_path):
    from diffmic.errors import UnreadableImageError
    from diffmic.evaluation.runner import load_images

    bomb = png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(UnreadableImageError, match=f"{bomb} is refused without being decoded"):
        load_images([bomb], transform=lambda image: image)


# --- run folders and locks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pid", [2**70, -1, 0, "12"])
def test_a_lock_whose_pid_no_process_can_have_is_refused_by_name(pid, tmp_path):
    from diffmic.fileio import sealed
    from diffmic.run.lock import RunLock, this_holder

    lock = RunLock(tmp_path)
    lock.path.write_text(json.dumps(sealed({**this_holder("other"), "pid": pid})))
    with pytest.raises(RunLockError, match=f"{lock.path} is not a lock diffmic wrote"):
        lock.acquire()
    assert lock.path.is_file()  # only the user can know that no run uses the folder


def test_metrics_are_never_appended_through_a_symbolic_link(tmp_path):
    from diffmic.run import RunFolder
    from diffmic.run.log import MetricsLog

    outside = tmp_path / "outside.jsonl"
    outside.write_text("mine\n")
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.metrics_file.symlink_to(outside)
    with pytest.raises(RunFileError, match="metrics.jsonl is a symbolic link"):
        MetricsLog(folder, True).write({"step": 1, "loss": 0.5})
    assert outside.read_text() == "mine\n"


def test_a_second_sweep_on_a_folder_in_use_stops_at_once(tmp_path):
    from diffmic.fileio import sealed
    from diffmic.run.lock import RunLock, this_holder

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    lock = RunLock(sweep)
    lock.path.write_text(json.dumps(sealed(this_holder("the first sweep"))))  # this live process holds it
    result = diffmic_here(["sweep", "--config", str(CONFIG), "--shards", str(tmp_path), "--out", str(sweep)])
    one_error_line(result, f"{sweep} is in use by another diffmic sweep")
    assert sorted(path.name for path in sweep.iterdir()) == [".lock"]


def test_compare_on_an_unfinished_sweep_says_to_run_the_sweep_again(tmp_path):
    from diffmic.launch.sweep import SweepPlan, plan_runs

    plan = SweepPlan("diffmic sweep --config a.yaml --seeds 2", None, plan_runs([("a.yaml", 1)], 2, {}, []))
    plan.runs[0].status = "finished"
    plan.save(tmp_path)
    result = diffmic_here(["compare", str(tmp_path)])
    one_error_line(result, "2 of the 2 run(s)", "run the sweep's command again", plan.command)


# --- the command line ------------------------------------------------------------------------------------------------
def test_ctrl_c_prints_one_line_and_exits_130(capsys, monkeypatch):
    import sys

    import typer

    from diffmic.cli.common import run_command

    app = typer.Typer()

    @app.command()
    def stopped() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["diffmic"])
    with pytest.raises(SystemExit) as done:
        run_command(app)
    assert done.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted (Ctrl-C)"
