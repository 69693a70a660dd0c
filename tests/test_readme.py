"""Every command the README shows runs as written, or the README says why the suite cannot run it.

The commands are taken from the README itself (```bash blocks and inline code that starts with a program)
and run in order in a scratch folder outside the repository, as a user's project: small datasets in their
native layouts under data/, and no configs/ or launch/ of its own (the packaged ones are found by name).
Three adjustments keep it to a CPU and about a minute, and all only add options: `diffmic shard` gets
--size 32, `diffmic train` gets TRAIN_BUDGET overrides (32 px, a smaller model, one step of each phase),
and Slurm submissions get --dry-run. The `s3://my-bucket/` commands run against the CI's S3 server (its session
bucket in place of my-bucket). Placeholders (<time>, NAME, $(diffmic configs path NAME)) are filled with what the
earlier commands made or what that command prints.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_fixtures import aptos_layout, ham_metadata_layout, imagefolder_layout, write_image
from engine_helpers import REPO, cpu_environment, diffmic_here, free_port

README = REPO / "README.md"
PROGRAMS = ("diffmic ", "accelerate launch ", "make ", "python ", "benchmarks/", "CI=true ", "torchrun ", "kubectl ")
REMOTE = "s3://my-bucket/"  # the README's bucket
# Added to `diffmic shard` and `diffmic train`: the paper's 224 px model and schedule would take hours on
# a CPU. 32 px images give a 1x1 saliency map, hence one ROI tile.
SHARD_BUDGET = ["--size", "32"]
TRAIN_BUDGET = ["data.image_size=32", "model.dcg.k=1", "model.dcg.backbone=resnet18",
                "model.dcg.local_backbone=resnet18", "model.denoiser.feature_dim=64", "train.batch_size=32",
                "train.dcg_warmup_epochs=1", "train.epochs=1", "train.max_steps=1", "train.val_every=1",
                "train.checkpoint_every=100",
                "train.mixed_precision=no", "data.num_workers=0", "eval.steps=3", "eval.batch_size=64"]
pytestmark = pytest.mark.timeout(900)


def readme_commands(text: str) -> list[str]:
    """Commands in order of appearance: lines of ```bash blocks (comments dropped) and inline code spans
    that start with a program name."""
    commands, block = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            block = None if block is not None else line[3:].strip() or "text"
            continue
        if block == "bash":
            command = re.split(r"\s+#\s", line)[0].strip()
            commands.append(command) if command else None
        elif block is None:
            commands += [span for span in re.findall(r"`([^`]+)`", line) if span.startswith(PROGRAMS)]
    return list(dict.fromkeys(commands))  # the same command twice runs once


def not_run_table(text: str) -> dict[str, str]:
    """The README's table of commands the suite does not run, with the reason for each."""
    block = text.split("<!-- not-run-by-tests:start -->")[1].split("<!-- not-run-by-tests:end -->")[0]
    rows = [re.match(r"\|\s*`([^`]+)`\s*\|\s*(.+?)\s*\|\s*$", line) for line in block.splitlines()]
    return {row.group(1): row.group(2) for row in rows if row}


def test_the_readme_explains_every_command_the_suite_does_not_run():
    text = README.read_text()
    skipped = not_run_table(text)
    assert skipped, "README.md lost its table of commands the suite does not run"
    commands = readme_commands(text)
    assert all(reason.strip(" -") for reason in skipped.values()), "every skipped command needs a reason"
    stale = [command for command in skipped if command not in commands]
    assert not stale, f"the not-run table names commands the README no longer shows: {stale}"
    assert len(commands) - len(skipped) >= 15, "the extraction found too few commands to run"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A user's working folder outside the repository: three downloads in their native layouts and three
    images to predict on; configs and launch files come from the package."""
    root = tmp_path_factory.mktemp("user")
    ham_metadata_layout(root / "data" / "ham10000", lesions_per_class=8)
    aptos_layout(root / "data" / "aptos2019", per_class=8)
    imagefolder_layout(root / "data" / "pmg2000", classes=("ductal", "lobular", "mucinous", "papillary"),
                       per_class=8)
    write_image(root / "photos" / "a.jpg", 1, seed=7)
    write_image(root / "photos" / "b.png", 2, seed=8)
    write_image(root / "lesion_042.jpg", 3, seed=9)
    return root


def fill_placeholders(command: str, root: Path) -> str:
    """<time> names the first run of that dataset (later ones may still be training in the background);
    $(diffmic configs path NAME) is what that command prints, as a shell would substitute it."""
    for name in re.findall(r"\$\(diffmic configs path ([\w./-]+)\)", command):
        found = diffmic_here(["configs", "path", name], cwd=root)
        check(found, f"diffmic configs path {name}")
        command = command.replace(f"$(diffmic configs path {name})", found.stdout.strip())
    if "<time>" in command:
        prefix = re.search(r"runs/([\w-]+)-<time>", command).group(1)
        runs = sorted((root / "runs").glob(f"{prefix}-*"), key=lambda path: path.stat().st_mtime)
        assert runs, f"no run folder runs/{prefix}-* yet for: {command}"
        command = command.replace(f"runs/{prefix}-<time>", f"runs/{runs[0].name}")
    return command.replace("shards/NAME", "shards/ham10000")


class Background:
    """A command in its own process, overlapping with the ones that run in this process (imports are
    single-threaded, so two at a time use the 2 cores better). Output goes to files, not pipes."""

    def __init__(self, command: str, argv: list[str], cwd: Path, logs: Path):
        self.command, self.argv = command, argv
        logs.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"\W+", "_", command)[:80]
        self.out, self.err = logs / f"{name}.out", logs / f"{name}.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.process = subprocess.Popen(argv, cwd=cwd, env=cpu_environment(2), stdout=out, stderr=err, text=True)

    def result(self, timeout: float = 600) -> subprocess.CompletedProcess:
        code = self.process.wait(timeout=timeout)
        return subprocess.CompletedProcess(self.argv, code, self.out.read_text(), self.err.read_text())


def check(result: subprocess.CompletedProcess, command: str) -> None:
    assert result.returncode == 0, (f"README command failed: {command}\n{' '.join(map(str, result.args))}\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")


def as_argv(command: str) -> list[str]:
    """The program of the command, from this environment, and the options the suite adds."""
    argv = shlex.split(command)
    if argv[:2] == ["accelerate", "launch"]:
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
                *argv[2:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    elif argv[0] != "diffmic":
        raise AssertionError(f"the suite does not know how to run `{command}`: run it in tests/test_readme.py or "
                             f"add it to the README's table of commands the suite does not run, with the reason")
    if ("train" in argv or "sweep" in argv) and "--slurm" in argv:
        argv.append("--dry-run")
    elif "train" in argv:
        argv += [item for override in TRAIN_BUDGET for item in ("--set", override)]
    elif "shard" in argv and "--help" not in argv:
        argv += SHARD_BUDGET
    return argv


def test_every_readme_command_runs_as_written(project):
    text = README.read_text()
    skipped = not_run_table(text)
    ran, background = [], []
    for command in readme_commands(text):
        if command in skipped or REMOTE in command:  # the s3:// commands: test_the_object_storage_commands_run
            continue
        argv = as_argv(fill_placeholders(command, project))
        if argv[0] == "diffmic":  # the console script's own entry point, in this process
            started = time.perf_counter()
            check(diffmic_here(argv[1:], cwd=project), command)
            print(f"{time.perf_counter() - started:6.1f} s  {command}")
        else:
            background.append(Background(command, argv, project, project / "logs"))
        ran.append(command)
    for job in background:
        check(job.result(), job.command)
    # What the commands promise is there.
    assert {path.name.split("-")[0] for path in (project / "runs").iterdir()} == {"ham10000", "aptos2019", "pmg2000"}
    for name in ("ham10000", "aptos2019", "pmg2000"):
        assert (project / "shards" / name / "manifest.json").is_file()
    outputs = list((project / "runs").glob("ham10000-*/eval/*/metrics.json"))
    assert len(outputs) >= 2, "the eval commands wrote no metrics.json"
    assert len(list((project / "runs").glob("ham10000-*/checkpoints/step-*/COMPLETE"))) >= 2
    assert len(ran) >= 15


def test_the_object_storage_commands_run_as_written(project, object_store, monkeypatch):
    """The README's s3:// commands in order, against the CI's S3 server: its session bucket stands for my-bucket,
    and the client finds the server through the standard variables, as a user's shell would give them."""
    for key, value in object_store.env.items():
        monkeypatch.setenv(key, value)
    text = README.read_text()
    skipped = not_run_table(text)
    commands = [command for command in readme_commands(text) if REMOTE in command and command not in skipped]
    assert len(commands) >= 5, commands
    for command in commands:
        command = command.replace(REMOTE, f"s3://{object_store.bucket}/readme/")
        check(diffmic_here(as_argv(fill_placeholders(command, project))[1:], cwd=project), command)
    listed = object_store.client().ls(f"{object_store.bucket}/readme/shards/ham10000")
    assert any(name.endswith("/manifest.json") for name in listed), listed
    cached = list((project / "cache" / "shards" / "s3" / object_store.bucket).rglob("train-*.tar"))
    assert cached, "data.cache_dir=cache/shards kept no shard"

