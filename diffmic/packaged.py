"""The configs and launch files that ship with diffmic, and the one rule that finds a file by name.

The repository keeps them in configs/ and launch/ at its root; a wheel carries the same files as
diffmic/resources/configs/ and diffmic/resources/launch/ (pyproject.toml maps the folders, so there is one
copy). A name such as `ham10000`, `reference/ham10000` or `deepspeed/zero2` is looked up in this order:

1. the text as a path (relative to the working folder), as given;
2. ./<folder>/<name> in the working folder (configs/ or launch/);
3. the packaged <folder>/<name>.

<name> is the text without a leading `<folder>/`; without a file extension, each of the folder's
extensions is tried. An absolute path is only ever itself.
"""

from __future__ import annotations

from pathlib import Path

# The shipped folders and the extensions of their files.
SUFFIXES = {"configs": (".yaml",), "launch": (".yaml", ".json", ".sbatch")}


class NotFoundError(FileNotFoundError):
    """No file of that name as a path, in the working folder or among the packaged files."""


def packaged_root() -> Path:
    """The folder that holds the packaged configs/ and launch/: diffmic/resources/ in an installed wheel, the
    repository root when diffmic runs from a checkout (on PYTHONPATH or installed editable)."""
    package = Path(__file__).resolve().parent
    installed = package / "resources"
    return installed if installed.is_dir() else package.parent


def _names(text: str, folder: str) -> list[str]:
    name = text[len(folder) + 1:] if text.startswith(f"{folder}/") else text
    if Path(name).suffix in SUFFIXES[folder]:
        return [name]
    return [name + suffix for suffix in SUFFIXES[folder]]


def candidates(text: str, folder: str) -> list[Path]:
    """Where `text` may be, in the order they are tried (see the module docstring)."""
    if Path(text).is_absolute():
        return [Path(text)]
    names = _names(text, folder)
    return [Path(text), *(Path(folder) / name for name in names),
            *(packaged_root() / folder / name for name in names)]


def find_file(text: str, folder: str, what: str = "file") -> Path:
    """The first of `candidates` that exists (step 1 also accepts a path that exists but is not a regular
    file, so that reading it says so). Raises NotFoundError naming what was looked for."""
    found = candidates(text, folder)
    if found[0].exists():
        return found[0]
    for path in found[1:]:
        if path.is_file():
            return path
    if Path(text).is_absolute():
        raise NotFoundError(f"no {what} {text}: the file does not exist")
    shipped = f"{folder}/{_names(text, folder)[0]}"
    if str(Path(text)) == shipped:
        raise NotFoundError(f"no {what} {shipped} in {Path.cwd()} or among diffmic's packaged files")
    raise NotFoundError(f"no {what} {text}: it is not a file in {Path.cwd()}, and there is no {shipped} there or "
                        f"among diffmic's packaged files")


def shipped_files(root: Path, folder: str) -> list[Path]:
    """The files of one shipped folder below `root` (the working folder or `packaged_root()`), sorted."""
    base = root / folder
    if not base.is_dir():
        return []
    return sorted(path for path in base.rglob("*") if path.is_file() and path.suffix in SUFFIXES[folder])
