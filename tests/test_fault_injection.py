"""Every file of a finished run, of a finished sweep and of their shards, damaged the ways a disk or a user damages
files, under every command that reads it. Each command must either succeed with the right result, or exit with
status 2 and one line that names the file; never a traceback, and never a change to a file outside the folder
it was given (the pristine run, sweep and shards, and the target of a planted symbolic link, are checked).

The run and the sweep are built once (tiny models, 48 images); each case works on a copy whose tensor files are
hard links (instant), and a damaged file is always a file of its own first, so no damage reaches the originals.
Commands run in this process (`diffmic_here`): the imports are paid once, not once per case.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from data_fixtures import imagefolder_layout, write_image
from engine_helpers import REPO, diffmic_here

pytestmark = pytest.mark.timeout(900)

CONFIG = str(REPO / "configs" / "digits.yaml")
# 3 classes of 16 images at 32 px: 24 train (3 batches of 8), 12 val, 12 test.
SETTINGS = ["data.image_size=32", "data.num_classes=3", "model.dcg.k=1", "model.denoiser.feature_dim=64",
            "train.batch_size=8", "train.log_every=1", "train.dcg_warmup_epochs=1", "train.epochs=1",
            "train.val_every=1", "train.keep_last=1", "eval.steps=2", "eval.n_samples=1", "eval.batch_size=16",
            "data.num_workers=0", "diffusion.noise_draws=2"]
SWEEP_SETTINGS = [*SETTINGS, "model.variant=basic"]
DAMAGES = ("truncate", "flip", "non-utf8", "delete", "read-only", "symlink")


def settings(values: list[str]) -> list[str]:
    return [item for value in values for item in ("--set", value)]


def train_args(run: Path, shards: Path) -> list[str]:
    return ["train", "--config", CONFIG, "--shards", str(shards), "--run-dir", str(run), "--no-progress",
            *settings(SETTINGS)]


def sweep_args(sweep: Path, shards: Path) -> list[str]:
    return ["sweep", "--config", CONFIG, "--shards", str(shards), "--out", str(sweep), *settings(SWEEP_SETTINGS)]


def succeeded(result, what: str) -> None:
    assert result.returncode == 0, f"{what} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


# --- the originals, built once --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Shards, a finished run (with a lock left by a dead process) and a finished sweep of one run, with the
    results each command gives on them undamaged."""
    from diffmic.data import ShardOptions, shard_dataset

    root = tmp_path_factory.mktemp("faults")
    imagefolder_layout(root / "images", per_class=16)
    shards = root / "shards"
    shard_dataset(ShardOptions(dataset="imagefolder", root=root / "images", out=shards, size=32, shard_size=8,
                               workers=1, test_fraction=0.25, val_fraction=1 / 3))
    run, sweep = root / "run", root / "sweep"
    succeeded(diffmic_here(train_args(run, shards)), "training the tiny run")
    succeeded(diffmic_here(sweep_args(sweep, shards)), "the tiny sweep")
    for folder in (run, sweep):
        plant_dead_lock(folder)
    image = write_image(root / "image.png", 1, size=(32, 32))
    return Originals(root, shards, run, sweep, image)


def plant_dead_lock(folder: Path) -> None:
    """A lock left behind by a process that died (it is stale: the next command takes it over)."""
    from diffmic.fileio import sealed
    from diffmic.run.lock import RunLock, this_holder

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {**this_holder("dead"), "pid": int(ended.stdout), "pid_started": None}
    RunLock(folder).path.write_text(json.dumps(sealed(holder), indent=2))


@dataclass
class Originals:
    root: Path
    shards: Path
    run: Path
    sweep: Path
    image: Path


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file under `folder`: a write, even through a hard link, shows."""
    return {path.relative_to(folder).as_posix(): (path.lstat().st_size, path.lstat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file() or path.is_symlink()}


# --- copies and damages ---------------------------------------------------------------------------------------
def copy_tree(source: Path, target: Path) -> Path:
    """A copy whose tensor and shard files are hard links to the originals (never written in place by diffmic);
    every other file is copied, since logs are appended to."""
    def link_or_copy(src, dst):
        return os.link(src, dst) if src.endswith((".safetensors", ".tar")) else shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy, symlinks=True)
    return target


def own_file(path: Path) -> bytes:
    """The file's bytes, with `path` made a file of its own (no longer a hard link to an original)."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return data


def damage(path: Path, how: str, outside: Path) -> Callable[[], contextlib.AbstractContextManager] | None:
    """Applies a damage to `path`; for a read-only one, returns the context under which the command must run."""
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        data = own_file(path)
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":  # one byte in the middle, same size: only a checksum can tell
        own_file(path)
        with open(path, "r+b") as handle:
            handle.seek(path.stat().st_size // 2)
            byte = handle.read(1)
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte[0] ^ 0x55]))
    elif how == "non-utf8":
        data = own_file(path)
        path.write_bytes(b"\xff\xfe\x80" + data[3:])
    elif how == "symlink":  # the same content, but in a file outside the folder
        os.link(path, outside) if path.suffix in (".safetensors", ".tar") else shutil.copy2(path, outside)
        path.unlink()
        path.symlink_to(outside)
    elif how == "read-only":
        own_file(path)
        return lambda: read_only(files=[path], folders=[])
    return None


def whole_folder_read_only(folder: Path) -> Callable[[], contextlib.AbstractContextManager]:
    return lambda: read_only(files=[p for p in folder.rglob("*") if p.is_file()],
                             folders=[folder, *(p for p in folder.rglob("*") if p.is_dir())])


@contextlib.contextmanager
def read_only(files: list[Path], folders: list[Path]) -> Iterator[None]:
    """`files` and `folders` made read-only for the command. As a plain user this is chmod. Tests also run as root
    (containers, CI images), whom chmod does not stop, and a read-only mount needs privileges and a mount
    namespace: as root the file system's refusal is simulated instead, by wrapping the os functions diffmic
    writes through (open, os.open, mkdir, rename, replace, link, unlink, rmdir) to raise what the kernel raises
    for a read-only file or folder: EACCES naming the path."""
    if os.geteuid() != 0:
        modes = {path: path.stat().st_mode for path in [*files, *folders]}
        for path in files:
            path.chmod(0o444)
        for path in folders:
            path.chmod(0o555)
        try:
            yield
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
        return
    with refused_writes({str(p) for p in files}, {str(p) for p in folders}):
        yield


@contextlib.contextmanager
def refused_writes(files: set[str], folders: set[str]) -> Iterator[None]:
    def where(path, dir_fd=None) -> str:
        path = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        return os.path.abspath(path)

    def check_entry(path, dir_fd=None) -> None:  # creating, removing or renaming a name in a folder
        path = where(path, dir_fd)
        if os.path.dirname(path) in folders:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    def check_write(path, creating: bool, dir_fd=None) -> None:
        full = where(path, dir_fd)
        if full in files or (creating and not os.path.lexists(full)):
            if full in files or os.path.dirname(full) in folders:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), full)

    real = {name: getattr(os, name) for name in ("open", "mkdir", "rename", "replace", "link", "unlink", "remove",
                                                 "rmdir", "symlink")}
    real_open = builtins.open

    def wrapped_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and any(flag in mode for flag in "wax+"):
            check_write(file, creating=True)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            check_write(path, bool(flags & os.O_CREAT), dir_fd)
        return real["open"](path, flags, mode, dir_fd=dir_fd)

    def entry(name: str, *positions: int):
        def call(*args, **kwargs):
            for index in positions:
                if index < len(args):
                    fd = kwargs.get("src_dir_fd" if index == 0 and len(positions) > 1 else "dir_fd")
                    check_entry(args[index], fd if name not in ("rename", "replace", "link") else None)
            return real[name](*args, **kwargs)
        return call

    patches = {"open": os_open, "mkdir": entry("mkdir", 0), "rename": entry("rename", 0, 1),
               "replace": entry("replace", 0, 1), "link": entry("link", 1), "unlink": entry("unlink", 0),
               "remove": entry("remove", 0), "rmdir": entry("rmdir", 0), "symlink": entry("symlink", 1)}
    try:
        for name, function in patches.items():
            setattr(os, name, function)
        builtins.open = io.open = wrapped_open
        yield
    finally:
        for name, function in real.items():
            setattr(os, name, function)
        builtins.open = io.open = real_open


# --- what each command must give ---------------------------------------------------------------------------------
@dataclass
class Case:
    folder: str  # "run", "sweep" or "shards": the folder the damaged file belongs to
    file: str  # its path inside that folder; "" for the whole folder made read-only
    damage: str
    command: str

    @property
    def name(self) -> str:
        return f"{self.command}: {self.damage} {self.folder}/{self.file}"


def checkpoint_files(run: Path, folder: str) -> list[str]:
    found = [p for p in (run / "checkpoints").glob(f"{folder}-*") if p.is_dir()]
    assert len(found) == 1, found
    return sorted(p.relative_to(run).as_posix() for p in found[0].rglob("*") if p.is_file())


def readers(originals: Originals) -> dict[str, dict[str, list[str]]]:
    """command -> folder -> the files of that folder the command reads."""
    run, sweep = originals.run, originals.sweep
    best = ["checkpoints/best.json", *checkpoint_files(run, "best")]
    bookkeeping = ["run.json", "metrics.jsonl", "config.yaml", ".lock"]
    run_name = next(p.name for p in (sweep / "runs").iterdir())
    status_file, sweep_run = f"runs/{run_name}/sweep-status.json", f"runs/{run_name}"
    shard_files = ["manifest.json", *[f"{split}-000000.tar" for split in ("train", "val", "test")]]
    assert all((originals.shards / name).is_file() for name in shard_files)
    return {
        "resume": {"run": [*bookkeeping, "checkpoints/best.json", *checkpoint_files(run, "step")],
                   "shards": shard_files},
        "eval": {"run": best, "shards": ["manifest.json", "test-000000.tar"]},
        "predict": {"run": best},
        "status": {"run": ["run.json", "metrics.jsonl"],
                   "sweep": ["sweep.json", status_file, f"{sweep_run}/eval/test/metrics.json"]},
        "report": {"run": ["metrics.jsonl"]},
        "compare": {"sweep": ["sweep.json", status_file, f"{sweep_run}/config.yaml",
                              f"{sweep_run}/eval/test/metrics.json"]},
        "sweep": {"sweep": ["sweep.json", ".lock", status_file]},
    }


def all_cases(originals: Originals, command: str) -> list[Case]:
    cases = []
    for folder, files in readers(originals)[command].items():
        cases += [Case(folder, file, how, command) for file in files for how in DAMAGES]
        cases.append(Case(folder, "", "read-only folder", command))
    return cases


class Workspace:
    """One case's copies: the folders the command is given, and a place outside them for a link's target.
    `case_folder` says which folder `status` is given (a run's or a sweep's)."""

    def __init__(self, originals: Originals, base: Path, case: Case | None = None):
        self.originals, self.base, self.case = originals, base, case
        self.case_folder = case.folder if case is not None else "run"
        self.outside_mtime: int | None = None
        self.run = copy_tree(originals.run, base / "run")
        self.sweep = copy_tree(originals.sweep, base / "sweep")
        self.shards = copy_tree(originals.shards, base / "shards")
        self.outside = base / "outside"
        self.outside.mkdir()

    def folder(self, name: str) -> Path:
        return {"run": self.run, "sweep": self.sweep, "shards": self.shards}[name]

    def command(self, name: str) -> list[str]:
        return {"resume": train_args(self.run, self.shards),
                "eval": ["eval", "--run", str(self.run), "--shards", str(self.shards), "--no-progress"],
                "predict": ["predict", "--run", str(self.run), str(self.originals.image)],
                "status": ["status", str(self.sweep if self.case_folder == "sweep" else self.run)],
                "report": ["report", str(self.run)],
                "compare": ["compare", str(self.sweep)],
                "sweep": sweep_args(self.sweep, self.shards)}[name]


def call(args: list[str]):
    """diffmic_here, with an exception that escapes the CLI turned into its traceback (a failure of the case)."""
    import traceback

    try:
        return diffmic_here(args)
    except Exception:  # noqa: BLE001 - anything escaping is exactly what this test exists to catch
        return subprocess.CompletedProcess(args, -1, "", traceback.format_exc())


def problem(case: Case, result, space: Workspace, expected: Callable[[Workspace, object], str]) -> str:
    """What is wrong with one case's outcome; "" when it is right."""
    text = result.stdout + result.stderr
    if "Traceback" in text or result.returncode not in (0, 2):
        return f"rc {result.returncode}: {text[-1500:]}"
    outside = space.outside / "target"
    if outside.exists() and outside.stat().st_mtime_ns != space.outside_mtime:
        return f"wrote to {outside}, outside the folder: {text[-500:]}"
    if result.returncode == 2:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        named = str(space.folder(case.folder) / case.file) if case.file else str(space.folder(case.folder))
        if len(errors) != 1 or named not in errors[0]:
            return f"exit 2 without one error line naming {named}: {result.stderr[-1500:]}"
        return ""
    return expected(space, result)


def metrics(folder: Path) -> dict:
    found = sorted(folder.rglob("metrics.json"), key=os.path.getmtime)
    return json.loads(found[-1].read_text()) if found else {}


# Each check compares with the same command's result on the undamaged copy (`baseline`).
def expect_resume(baseline):
    def check(space, result):
        text = " ".join((result.stdout + result.stderr).split())
        if "already finished" in text:
            return ""
        # The last checkpoint lost its record: the run cannot resume where it stopped, and must say so by name.
        if "warning:" in text and f"{space.case.file} is missing" in text:
            return ""
        return f"neither finished nor named {space.case.file}: {text[-800:]}"
    return check


def expect_eval(baseline):
    def check(space, result):
        found = metrics(space.run / "eval")
        keys = ("accuracy", "dcg_accuracy", "manifest_sha256")
        same = {key: found.get(key) for key in keys} == {key: baseline.get(key) for key in keys}
        return "" if same else f"metrics {found} differ from {baseline}"
    return check


def predictions(run: Path) -> str:
    from diffmic.run import RunFolder

    found = sorted(RunFolder(run).predictions_dir.glob("*.csv"))
    return found[-1].read_text() if found else ""


def expect_predict(baseline):
    def check(space, result):
        rows = predictions(space.run)
        return "" if rows == baseline else f"predictions {rows!r} differ from {baseline!r}"
    return check


def expect_table(baseline: str):
    """compare: the table it writes is the undamaged sweep's."""
    def check(space, result):
        table = space.sweep / "compare.csv"
        found = table.read_text() if table.is_file() else ""
        return "" if found == baseline else f"compare.csv {found!r} differs from {baseline!r}"
    return check


def expect_curves(baseline):
    return lambda space, result: "" if (space.run / "curves.png").is_file() else "no curves.png"


def expect_sweep(baseline):
    return lambda space, result: ("" if "1 of 1 run(s) already finished" in result.stdout
                                  else f"did not find its run finished: {result.stdout[-800:]}")


def baseline_of(originals: Originals, command: str, base: Path):
    space = Workspace(originals, base)
    space.case_folder = "sweep" if command in ("compare", "sweep") else "run"
    result = call(space.command(command))
    succeeded(result, f"{command} on the undamaged copy")
    if command == "eval":
        return expect_eval(metrics(space.run / "eval"))
    if command == "predict":
        return expect_predict(predictions(space.run))
    if command == "compare":
        return expect_table((space.sweep / "compare.csv").read_text())
    if command == "status":  # the run's and the sweep's status lines that carry numbers
        space.case_folder = "sweep"
        sweep_lines = call(space.command("status")).stdout.splitlines()
        run_lines = result.stdout.splitlines()
        expected = [line for line in run_lines if "accuracy" in line], [line for line in sweep_lines if "finished" in line]
        assert all(expected), (run_lines, sweep_lines)
        return expect_status(*expected)
    return {"resume": expect_resume, "report": expect_curves, "sweep": expect_sweep}[command](None)


def expect_status(run_lines: list[str], sweep_lines: list[str]):
    def check(space, result):
        expected = sweep_lines if space.case_folder == "sweep" else run_lines
        if space.case_folder == "run" and not (space.run / "metrics.jsonl").is_file():
            return ""  # without a log there is no last validation to show
        if space.case.damage == "truncate" and space.case.file == "metrics.jsonl":  # as while a training writes
            said = f"warning: {space.run / 'metrics.jsonl'} line"
            return "" if said in " ".join(result.stderr.split()) else f"no warning of the cut line: {result.stderr}"
        kept = [line for line in expected if line in result.stdout]
        return "" if kept == expected else f"missing {set(expected) - set(kept)} in:\n{result.stdout[-1500:]}"
    return check


COMMANDS = ("resume", "eval", "predict", "status", "report", "compare", "sweep")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_damaged_file_is_refused_by_name_or_read_right(pristine, command, tmp_path, capsys):
    before = {name: snapshot(folder) for name, folder in
              (("run", pristine.run), ("sweep", pristine.sweep), ("shards", pristine.shards))}
    expected = baseline_of(pristine, command, tmp_path / "baseline")
    cases = all_cases(pristine, command)
    failures = []
    for number, case in enumerate(cases):
        base = tmp_path / f"case{number}"
        space, result = run_case(pristine, case, base)
        found = problem(case, result, space, expected)
        if found:
            failures.append(f"{case.name}: {found}")
        shutil.rmtree(base, ignore_errors=True)
    after = {name: snapshot(folder) for name, folder in
             (("run", pristine.run), ("sweep", pristine.sweep), ("shards", pristine.shards))}
    with capsys.disabled():
        print(f"\n{command}: {len(cases)} (file, damage) cases, {len(failures)} failed")
    assert after == before, "a command changed the original run, sweep or shards"
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n\n".join(failures)


def run_case(originals: Originals, case: Case, base: Path):
    """The case's damage on fresh copies, then its command; the link target's modification time is kept first
    (a write to it is a write outside the folder)."""
    space = Workspace(originals, base, case)
    target = space.folder(case.folder) / case.file
    context = (whole_folder_read_only(space.folder(case.folder)) if case.damage == "read-only folder"
               else damage(target, case.damage, space.outside / "target"))
    outside = space.outside / "target"
    space.outside_mtime = outside.stat().st_mtime_ns if outside.exists() else None
    with (context() if context else contextlib.nullcontext()):
        result = call(space.command(case.command))
    return space, result


# --- where an evaluation goes ------------------------------------------------------------------------------------
def test_a_second_evaluation_into_the_same_out_replaces_the_first_whole(pristine, tmp_path):
    run, out = copy_tree(pristine.run, tmp_path / "run"), tmp_path / "out"
    succeeded(diffmic_here(["eval", "--run", str(run), "--split", "val", "--out", str(out), "--no-progress"]), "eval")
    (out / "notes-of-the-first.txt").write_text("a file the first evaluation left")
    succeeded(diffmic_here(["eval", "--run", str(run), "--split", "test", "--out", str(out), "--no-progress",
                            "--sampler", "ddim"]), "the second eval")
    fresh = tmp_path / "fresh"
    succeeded(diffmic_here(["eval", "--run", str(run), "--split", "test", "--out", str(fresh), "--no-progress",
                            "--sampler", "ddim"]), "the same eval into a new folder")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fresh.iterdir())
    assert (out / "predictions.csv").read_text() == (fresh / "predictions.csv").read_text()
    assert json.loads((out / "metrics.json").read_text())["split"] == "test"


def test_a_checkpoint_given_by_its_absolute_path_gets_a_flat_default_folder(pristine, tmp_path):
    run = copy_tree(pristine.run, tmp_path / "run")
    best = next((run / "checkpoints").glob("best-*"))
    succeeded(diffmic_here(["eval", "--run", str(run), "--checkpoint", str(best), "--no-progress"]), "eval")
    written = [path.parent for path in (run / "eval").rglob("metrics.json")]
    assert [folder.parent for folder in written] == [run / "eval"], written
    assert best.name in written[0].name
