"""The README's Architecture section states the order of diffmic's packages; no module may import a package
that stands later in that order. Every import counts, also one inside a function: a lazy import is still a
dependency, only a later one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from engine_helpers import REPO

PACKAGE = REPO / "diffmic"
ORDER_START, ORDER_END = "<!-- import-order:start -->", "<!-- import-order:end -->"


def stated_order() -> list[list[str]]:
    """The layers as the README lists them, lowest first: the diffmic/... places each numbered line names."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(ORDER_START) + len(ORDER_START):text.index(ORDER_END)]
    layers = [re.findall(r"`(diffmic/[^`]*)`", line) for line in section.splitlines() if re.match(r"\d+\. ", line)]
    assert layers and all(layers), "every numbered line of the import order names its diffmic/ places"
    return layers


def layer_of(module: str, layers: list[list[str]]) -> int:
    """The layer of a dotted module name: the file named itself, else its package, else the top-level modules."""
    parts = module.split(".")
    if len(parts) > 1 and (PACKAGE / parts[1]).is_dir():
        candidates = [f"diffmic/{parts[1]}"]
    else:
        name = parts[1] if len(parts) > 1 else "__init__"
        candidates = [f"diffmic/{name}.py", "diffmic/*.py"]
    for candidate in candidates:
        for index, places in enumerate(layers):
            if candidate in places:
                return index
    raise AssertionError(f"{module} belongs to no layer of the README's import order; add it there")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted name) of every diffmic module the module `name` imports in `source`, relative imports
    resolved."""
    package = name if is_package else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            # `from .. import checkpoint` imports the package diffmic.checkpoint; `from .. import __version__` a name.
            found += [(node.lineno, f"{target}.{alias.name}" if (PACKAGE.parent / target.replace(".", "/") /
                                                                  alias.name).is_dir() else target)
                      for alias in node.names]
    return [(line, module) for line, module in found if module == "diffmic" or module.startswith("diffmic.")]


def upward_imports(source: str, name: str, layers: list[list[str]], is_package: bool = False) -> list[str]:
    own = layer_of(name, layers)
    return [f"line {line} imports {module}" for line, module in imported_modules(source, name, is_package)
            if layer_of(module, layers) > own]


def test_no_package_imports_one_later_in_the_readmes_order():
    layers = stated_order()
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "resources" in path.parts:
            continue
        found = upward_imports(path.read_text(), module_name(path), layers, path.name == "__init__.py")
        upward += [f"{path.relative_to(REPO)}: {problem}" for problem in found]
    assert not upward, "imports against the README's order:\n" + "\n".join(upward)


def test_the_order_names_every_package_once():
    places = [place for layer in stated_order() for place in layer]
    packages = {f"diffmic/{folder.name}" for folder in PACKAGE.iterdir() if (folder / "__init__.py").is_file()}
    assert packages <= set(places) and len(places) == len(set(places)) and "diffmic/*.py" in places


def test_an_import_of_a_later_package_is_caught_also_inside_a_function():
    layers = stated_order()
    source = "from ..config import Config\n\n\ndef later():\n    from ..cli.common import app\n    import diffmic.run\n"
    assert upward_imports(source, "diffmic.data.probe", layers) == ["line 5 imports diffmic.cli.common",
                                                                     "line 6 imports diffmic.run"]
    assert upward_imports(source, "diffmic.cli.probe", layers) == []
