"""diffmic as a user installs it: a wheel built from the tracked files alone, installed (not editable) into a
fresh virtual environment outside the repository, then used from an empty folder: shard, train, evaluate.
Nothing may be read from the repository; an audit hook in the fresh environment logs every file it opens
there, and the test fails on any.

The dependencies are not installed a second time (torch and torchvision alone take about 55 s and 5.5 GB
from this machine's local wheels, on every run): the fresh environment sees the suite's own through a
.pth file, and pip still resolves the wheel's requirements against them, offline, with constraints.txt.
What this test is about (the wheel's contents, its metadata, its console script and its packaged files
used from elsewhere) is all exercised; installing torch again would only measure pip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from engine_helpers import REPO

pytestmark = pytest.mark.timeout(900)
TRAIN_BUDGET = ["data.image_size=32", "model.dcg.k=1", "model.denoiser.feature_dim=64", "train.batch_size=32",
                "train.dcg_warmup_epochs=0", "train.epochs=1", "train.max_steps=2", "train.val_every=1",
                "eval.steps=5", "eval.n_samples=1"]
# Runs at start-up in every process of the fresh environment (DataLoader workers included).
GUARD = '''
import os, sys
_root = os.environ.get("DIFFMIC_GUARD_ROOT")
if _root:
    _root = os.path.realpath(_root) + os.sep
    _allowed = tuple(os.path.realpath(part) + os.sep
                     for part in os.environ.get("DIFFMIC_GUARD_ALLOW", "").split(os.pathsep) if part)
    _log = os.environ["DIFFMIC_GUARD_LOG"]

    def _guard(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0]))
            if path.startswith(_root) and not (_allowed and path.startswith(_allowed)):
                with open(_log, "a") as handle:
                    handle.write(path + "\\n")

    sys.addaudithook(_guard)
'''


def run(argv: list, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    result = subprocess.run([str(part) for part in argv], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    print(f"{time.perf_counter() - started:6.1f} s  {' '.join(map(str, argv[:4]))} ...")
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def tracked_files() -> list[str]:
    """What a clean clone of this working tree holds: tracked files and new ones git does not ignore."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the repository's git checkout to know its tracked files")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


def build_wheel(folder: Path) -> Path:
    files = tracked_files()
    source = folder / "clone"
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-w", folder / "dist", source], cwd=folder)
    (wheel,) = (folder / "dist").glob("diffmic-*.whl")
    expected = {name for name in files if name.startswith("diffmic/") and name.endswith(".py")}
    expected |= {f"diffmic/resources/{name}" for name in files if name.startswith(("configs/", "launch/"))}
    missing = expected - set(zipfile.ZipFile(wheel).namelist())
    assert not missing, f"the wheel lacks {sorted(missing)}: list their folders in pyproject.toml"
    return wheel


def fresh_environment(folder: Path, wheel: Path) -> Path:
    """A new virtual environment holding only the wheel; the suite's packages are visible beneath it."""
    env = folder / "env"
    run([sys.executable, "-m", "venv", "--without-pip", env], cwd=folder)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    mine = sysconfig.get_paths()
    (site / "suite_packages.pth").write_text("\n".join(sorted({mine["purelib"], mine["platlib"]})) + "\n")
    (site / "diffmic_repo_guard.py").write_text(GUARD)
    (site / "diffmic_repo_guard.pth").write_text("import diffmic_repo_guard\n")
    shutil.copy(REPO / "constraints.txt", folder / "constraints.txt")
    run([sys.executable, "-m", "pip", "--python", env / "bin" / "python", "install", "--quiet", "--no-index",
         "--disable-pip-version-check", "-c", folder / "constraints.txt", wheel], cwd=folder)
    return env


def test_the_wheel_works_from_a_folder_outside_the_repository(tmp_path):
    started = time.perf_counter()
    env = fresh_environment(tmp_path, build_wheel(tmp_path))
    print(f"{time.perf_counter() - started:6.1f} s  wheel built and installed")
    user = tmp_path / "user"
    user.mkdir()
    guard_log = tmp_path / "read-from-the-repository.txt"
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    environment.update({"PATH": f"{env / 'bin'}{os.pathsep}{environment.get('PATH', '')}", "OMP_NUM_THREADS": "2",
                        "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"), "COLUMNS": "200",
                        "DIFFMIC_GUARD_ROOT": str(REPO), "DIFFMIC_GUARD_ALLOW": sys.prefix,
                        "DIFFMIC_GUARD_LOG": str(guard_log)})
    diffmic = env / "bin" / "diffmic"

    where = run([env / "bin" / "python", "-c", "import diffmic.packaged as p; print(p.__file__, p.packaged_root())"],
                cwd=user, env=environment).stdout.split()
    packaged = env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "diffmic"
    assert [Path(part) for part in where] == [packaged / "packaged.py", packaged / "resources"]
    assert "torch " in run([diffmic, "--version"], cwd=user, env=environment).stdout
    run([diffmic, "shard", "--dataset", "digits", "--size", "32", "--workers", "2"], cwd=user, env=environment)
    trained = run([diffmic, "train", "--dataset", "digits", "--no-progress",
                   *[item for override in TRAIN_BUDGET for item in ("--set", override)]], cwd=user, env=environment)
    (run_dir,) = (user / "runs").glob("digits-*")
    config = packaged / "resources" / "configs" / "digits.yaml"
    assert json.loads((run_dir / "run.json").read_text())["config_file"] == str(config)
    assert f"config {config}" in " ".join(trained.stderr.split())
    run([diffmic, "eval", "--run", run_dir.relative_to(user), "--no-progress"], cwd=user, env=environment)
    assert list(run_dir.glob("eval/*/metrics.json"))
    accelerate_file = run([diffmic, "configs", "path", "accelerate/multi_gpu"], cwd=user, env=environment).stdout
    assert Path(accelerate_file.strip()) == packaged / "resources" / "launch" / "accelerate" / "multi_gpu.yaml"
    read = sorted(set(guard_log.read_text().splitlines())) if guard_log.exists() else []
    assert not read, f"the installed diffmic read files of the repository: {read[:20]}"
