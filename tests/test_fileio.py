"""The one atomic-write helper: a failed write leaves the old file and no temporary behind."""

from __future__ import annotations

import json

import pytest

from diffmic.fileio import write_atomic, write_json_atomic, write_text_atomic


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_json_atomic(target, {"accuracy": 0.5})
    write_json_atomic(target, {"accuracy": 0.75})
    assert json.loads(target.read_text()) == {"accuracy": 0.75}
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_a_failed_write_keeps_the_old_content(tmp_path):
    target = tmp_path / "config.yaml"
    write_text_atomic(target, "old: 1\n")

    def fails_half_way(temporary):
        temporary.write_text("new: ")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(target, fails_half_way)
    assert target.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
