"""The dataset layouts `diffmic shard --dataset NAME` reads: one `Layout` per layout, registered next to
its reader (sources.py, presplit.py, digits.py). Everything else (the shard defaults, `diffmic shard
--help`, the error for an unknown name) is read from here, so adding a layout is one reader and its entry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sources import SourceData


@dataclass(frozen=True)
class Layout:
    """A layout's reader and the defaults it implies. The reader takes, by keyword, only those of
    `root` (a Path), `classes` (the --classes list or None) and `size` (pixels) it needs."""

    name: str
    reader: Callable[..., SourceData]
    summary: str  # one line of `diffmic shard --help`: what the layout is
    test_fraction: float  # the paper's test share for data of this kind
    classes: tuple[str, ...] | None = None  # fixed by the dataset; None: read from the data or --classes
    root: str | None = "data/{name}"  # default --root ({name}: the shard name); None: the layout reads no files
    size: int = 224  # default --size
    groups: str | None = None  # the metadata column whose images move together between splits (lesion_id)

    @property
    def fixed_classes(self) -> bool:
        return self.classes is not None

    def default_root(self, name: str) -> Path | None:
        return None if self.root is None else Path(self.root.format(name=name))

    def read(self, root: Path | None, classes: list[str] | None, size: int) -> SourceData:
        given = {"root": root, "classes": classes, "size": size}
        return self.reader(**{parameter: given[parameter] for parameter in inspect.signature(self.reader).parameters})


# In the order `diffmic shard --help` lists them: the order their modules register them (diffmic.data
# imports every such module, so the registry is complete once any part of diffmic.data is imported).
LAYOUTS: dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
    if layout.name in LAYOUTS:
        raise ValueError(f"two dataset layouts are named {layout.name!r}")
    LAYOUTS[layout.name] = layout
    return layout

