"""Seeded, stratified (and, for HAM10000, lesion-grouped) train/val/test splits, or a given split.

A split depends only on the records' keys, labels and groups and the seed, never on the order a CSV lists
them in, so the same inputs and seed give the same split byte for byte.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from .manifest import SPLIT_NAMES
from .presplit import is_list_entry, list_key, load_split_list, split_named_by
from .sources import Problem, Record, ShardError, read_csv, safe_key

# Streams of the split seed, so that the test cut, the val cut, the sample order and the folds never share
# draws.
TEST_STREAM, VAL_STREAM, ORDER_STREAM, FOLD_STREAM = 0, 1, 2, 3


def _unit_of(record: Record, grouped: bool) -> tuple[str, str]:
    return ("lesion", record.group) if grouped and record.group else ("image", record.key)


def _units_by_class(records: list[Record], grouped: bool) -> dict[int, list[tuple[str, str]]]:
    """The units that move together (a lesion with `grouped`, else an image), sorted, under the class they
    count for: a lesion's most frequent label (the lowest on a tie)."""
    units: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for record in records:
        units[_unit_of(record, grouped)].append(record)
    units_by_class: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for unit in sorted(units):
        counts = Counter(record.label for record in units[unit])
        top = max(counts.values())
        units_by_class[min(label for label, count in counts.items() if count == top)].append(unit)
    return units_by_class


def stratified_holdout(records: list[Record], fraction: float, seed: int, stream: int,
                       grouped: bool) -> tuple[list[Record], list[Record]]:
    """(kept, held out): about `fraction` of each class held out. With `grouped`, whole lesions move
    together; a lesion counts under its most frequent label."""
    units_by_class = _units_by_class(records, grouped)
    rng = np.random.default_rng([seed, stream])
    held_units = set()
    for label in sorted(units_by_class):
        members = units_by_class[label]
        take = int(np.floor(len(members) * fraction + 0.5))
        held_units.update(members[index] for index in rng.permutation(len(members))[:take])
    kept = [record for record in records if _unit_of(record, grouped) not in held_units]
    held = [record for record in records if _unit_of(record, grouped) in held_units]
    return kept, held


def assign_splits(records: list[Record], test_fraction: float, val_fraction: float, seed: int,
                  grouped: bool) -> dict[str, list[Record]]:
    """Splits fixed by the source (or --split-from) are kept; a missing test split is cut from train with
    `test_fraction`, then val from the rest of train with `val_fraction` (0 means no val split).
    Each split comes back in a seeded random order, the order its shards are written in."""
    records = sorted(records, key=lambda record: record.key)
    pools = {name: [record for record in records if record.split == name] for name in SPLIT_NAMES}
    pools["train"] += [record for record in records if record.split is None]
    if not pools["test"]:
        pools["train"], pools["test"] = stratified_holdout(pools["train"], test_fraction, seed, TEST_STREAM, grouped)
    if not pools["val"] and val_fraction > 0:
        pools["train"], pools["val"] = stratified_holdout(pools["train"], val_fraction, seed, VAL_STREAM, grouped)
    splits = {}
    for index, name in enumerate(SPLIT_NAMES):
        if pools[name] or name != "val":
            order = np.random.default_rng([seed, ORDER_STREAM, index]).permutation(len(pools[name]))
            splits[name] = [pools[name][position] for position in order]
    return splits


def assign_folds(records: list[Record], folds: int, seed: int, grouped: bool) -> dict[str, int]:
    """key -> fold in 0..folds-1, stratified by class (each class's units dealt out in a seeded order) and,
    with `grouped`, by lesion (all images of a lesion in one fold). The deal continues from class to class,
    so the folds' sizes differ by at most one unit per class."""
    units_by_class = _units_by_class(records, grouped)
    fold_of_unit, dealt = {}, 0
    rng = np.random.default_rng([seed, FOLD_STREAM])
    for label in sorted(units_by_class):
        members = units_by_class[label]
        for position in rng.permutation(len(members)):
            fold_of_unit[members[position]] = dealt % folds
            dealt += 1
    return {record.key: fold_of_unit[_unit_of(record, grouped)] for record in records}


def _read_split_csv(path: Path) -> dict[str, str]:
    given = {}
    for line, row in read_csv(path, ["key", "split"]):
        if row["split"] not in SPLIT_NAMES:
            raise ShardError(f"{path}:{line}: split {row['split']!r} is not one of {', '.join(SPLIT_NAMES)}")
        key = safe_key(row["key"])
        if given.get(key, row["split"]) != row["split"]:
            raise ShardError(f"{path}:{line}: {row['key']} is listed in two splits")
        given[key] = row["split"]
    return given


def read_split_files(paths: list[Path]) -> dict[str, str]:
    """key -> split from CSVs of key,split and/or the authors' pickled lists (split from the file name)."""
    given: dict[str, str] = {}
    for path in paths:
        if not path.is_file():
            raise ShardError(f"split file {path} does not exist; check --split-from")
        if path.suffix.lower() == ".pkl":
            split = split_named_by(path)
            entries = load_split_list(path)
            if not all(is_list_entry(entry) for entry in entries):
                raise ShardError(f"{path}: every entry must be {{'img_root': <path>, 'label': <integer>}}")
            found = {list_key(entry["img_root"]): split for entry in entries}
        else:
            found = _read_split_csv(path)
        clashes = sorted(key for key, split in found.items() if given.get(key, split) != split)
        if clashes:
            raise ShardError(f"{path} puts {clashes[0]} (and {len(clashes) - 1} more) in a different split "
                             f"than an earlier --split-from file")
        given.update(found)
    return given


def apply_given_splits(records: list[Record], problems: list[Problem], given: dict[str, str],
                       described_as: str) -> list[Record]:
    """Sets each record's split from `given`; a record it does not list, or a listed key the source
    lacks, becomes a problem, so nothing is left out silently."""
    kept = []
    for record in records:
        if record.key in given:
            record.split = given[record.key]
            kept.append(record)
        else:
            problems.append(Problem(record.source, f"not listed in {described_as}", record.key))
    known = {record.key for record in records} | {problem.key for problem in problems}
    problems.extend(Problem(described_as, f"lists {key}, which the source does not have", key)
                    for key in sorted(set(given) - known))
    return kept
