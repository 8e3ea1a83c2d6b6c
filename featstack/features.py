"""Load cached features of chosen backbones, joined on id (never on row position), with split and labels."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FeatstackError
from .paths import DatasetPaths
from .split import read_dataset_meta, read_split
from .store import read_attrs, read_entry

# Attributes that must agree across backbones stacked together; input size and weights file differ by design.
MUST_AGREE = ("pooling", "tta", "precision")


@dataclass
class FeatureSet:
    """Rows of one dataset: ids, split, labels, and the features of each backbone in the same row order."""

    paths: DatasetPaths
    meta: dict
    ids: np.ndarray
    split: np.ndarray
    labels: np.ndarray
    blocks: dict[str, np.ndarray]
    entries: dict[str, dict] = field(default_factory=dict)  # backbone -> file name and attributes

    @property
    def classes(self) -> list[str]:
        return sorted({l for l in self.labels if l is not None})

    @property
    def matrix(self) -> np.ndarray:
        return np.hstack(list(self.blocks.values())) if len(self.blocks) > 1 else next(iter(self.blocks.values()))

    @property
    def column_ranges(self) -> dict[str, tuple[int, int]]:
        out, start = {}, 0
        for name, block in self.blocks.items():
            out[name] = (start, start + block.shape[1])
            start += block.shape[1]
        return out

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def cached_backbones(paths: DatasetPaths) -> dict[str, list[Path]]:
    """Backbone name -> its feature files in this dataset's store."""
    out: dict[str, list[Path]] = {}
    for path in paths.entry_files():
        out.setdefault(read_attrs(path).get("backbone", path.stem), []).append(path)
    return out


def _choose(paths: DatasetPaths, names: list[str] | None) -> dict[str, Path]:
    cached = cached_backbones(paths)
    if not cached:
        raise FeatstackError(f"{paths.root}: no cached features; run extract_features.py first")
    listing = ", ".join(f"{b} ({', '.join(p.stem for p in ps)})" for b, ps in cached.items())
    chosen = {}
    for name in names or list(cached):
        by_stem = [p for ps in cached.values() for p in ps if p.stem == name]
        files = by_stem or cached.get(name)
        if not files:
            raise FeatstackError(f"--backbones: {name!r} is not cached in {paths.root}; cached: {listing}")
        if len(files) > 1:
            raise FeatstackError(f"--backbones: {name!r} is cached in {len(files)} configurations; name one by its file "
                                 f"stem: {', '.join(p.stem for p in files)}")
        backbone = next(b for b, ps in cached.items() if files[0] in ps)
        chosen[backbone] = files[0]
    return chosen


def load_features(features: str | Path, backbones: list[str] | None = None, allow_missing: bool = False) -> FeatureSet:
    paths = DatasetPaths(Path(features))
    if not paths.root.is_dir():
        raise FeatstackError(f"--features {features}: no such folder; pass a dataset folder under features/")
    split = read_split(paths)
    meta = read_dataset_meta(paths)
    entries = {name: read_entry(path) for name, path in _choose(paths, backbones).items()}
    for key in MUST_AGREE:
        values = {name: e.attrs.get(key) for name, e in entries.items()}
        if len(set(values.values())) > 1:
            raise FeatstackError(f"refusing to mix feature files made with different {key}: "
                                 f"{', '.join(f'{n}={v}' for n, v in values.items())}; choose matching --backbones")
    kinds = {name: e.attrs.get("weights") == "random" for name, e in entries.items()}
    if len(set(kinds.values())) > 1:
        raise FeatstackError("refusing to mix random-weight and trained-weight features: "
                             f"{', '.join(n + (' (random)' if r else '') for n, r in kinds.items())}")
    split_ids = split["id"].to_numpy(object)
    keep = np.ones(len(split_ids), bool)
    rows_of = {}
    for name, e in entries.items():
        if len(e.ids) == len(split_ids) and np.array_equal(e.ids, split_ids):
            rows_of[name] = None  # already in split order: no copy of the matrix
            continue
        row_of = dict(zip(e.ids, range(len(e.ids))))
        rows = np.fromiter((row_of.get(i, -1) for i in split_ids), np.int64, len(split_ids))
        present = rows >= 0
        if not present.all():
            if not allow_missing:
                raise FeatstackError(f"{e.path.name}: {int((~present).sum())} of {len(split_ids)} ids of split.csv have "
                                     f"no {name} features; rerun extract_features.py, or pass --allow-missing to use "
                                     "the ids every backbone has")
            keep &= present
        rows_of[name] = rows
    blocks = {}
    for name, e in entries.items():
        rows = rows_of[name]
        if rows is None:
            blocks[name] = e.features if keep.all() else e.features[keep]
        else:
            blocks[name] = e.features[rows[keep]]
    split = split[keep].reset_index(drop=True)
    return FeatureSet(paths, meta, split["id"].to_numpy(object), split["split"].to_numpy(object),
                      split["label"].to_numpy(object), blocks,
                      {n: {"file": e.path.name, **e.attrs} for n, e in entries.items()})
