"""The fixed train / holdout / test split of a dataset: decided once, written to split.csv, reused by every stage."""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from .errors import FeatstackError
from .paths import DatasetPaths
from .store import disk_full_error, is_disk_full

SPLITS = ("train", "holdout", "test")


def write_atomic(path: Path, write) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(path.parent, path.name) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def assign_holdout(table: pd.DataFrame, holdout: float, seed: int) -> pd.DataFrame:
    """Fill the split column: a stratified holdout fraction of the labelled rows not already placed."""
    if not 0 <= holdout < 1:
        raise FeatstackError(f"--holdout {holdout}: must be at least 0 and below 1")
    table = table.copy()
    labelled = table["label"].notna()
    free = labelled & table["split"].isna()
    table.loc[free, "split"] = "train"
    if holdout > 0 and free.sum():
        counts = table.loc[free, "label"].value_counts()
        if (counts < 2).any():
            raise FeatstackError(
                f"class {counts.idxmin()!r} has only {counts.min()} labelled image; a stratified holdout needs 2 "
                "per class: add images or pass --holdout 0")
        n, classes = int(free.sum()), len(counts)
        held_count = math.ceil(holdout * n)  # how scikit-learn rounds a fractional test_size
        if held_count < classes:
            # A stratified holdout needs one image of every class: a small dataset holds out one per class.
            print(f"--holdout {holdout} of {n} labelled images is fewer than one per class; holding out {classes} "
                  "(one per class)")
            held_count = classes
        if n - held_count < classes:
            raise FeatstackError(f"--holdout {holdout}: holding out {held_count} of {n} labelled images leaves fewer "
                                 f"training images than the {classes} classes; pass a smaller --holdout")
        _, held = train_test_split(table.index[free], test_size=held_count, random_state=seed,
                                   stratify=table.loc[free, "label"])
        table.loc[held, "split"] = "holdout"
    table.loc[~labelled, "split"] = "test"
    return table


def _hash_fraction(image_id: str, seed: int) -> float:
    digest = hashlib.sha1(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class SplitPlan:
    """The split a run will use, decided in memory: written only once the run can go ahead."""

    table: pd.DataFrame  # the run's table with its split column filled
    saved: pd.DataFrame  # split.csv's rows: every id it held before, then the new ones
    meta: dict  # dataset.json

    def write(self, paths: DatasetPaths) -> None:
        paths.root.mkdir(parents=True, exist_ok=True)
        meta = {**self.meta, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_atomic(paths.split_csv, lambda p: self.saved.to_csv(p, index=False))
        write_atomic(paths.dataset_json, lambda p: p.write_text(json.dumps(meta, indent=2)))


def resolve_split(paths: DatasetPaths, table: pd.DataFrame, *, holdout: float, seed: int, layout: str,
                  data: Path) -> pd.DataFrame:
    """The table with its split, taken from split.csv when it exists; split.csv and dataset.json are (re)written."""
    plan = plan_split(paths, table, holdout=holdout, seed=seed, layout=layout, data=data)
    plan.write(paths)
    return plan.table


def plan_split(paths: DatasetPaths, table: pd.DataFrame, *, holdout: float, seed: int, layout: str,
               data: Path) -> SplitPlan:
    """The table with its split, taken from split.csv when it exists (new ids are placed deterministically)."""
    params = {"holdout": holdout, "seed": seed}
    if paths.split_csv.exists() and paths.dataset_json.exists():
        meta = json.loads(paths.dataset_json.read_text())
        old = {k: meta.get(k) for k in params}
        if old != params:
            raise FeatstackError(
                f"{paths.split_csv} was made with --holdout {old['holdout']} --seed {old['seed']}; this run asks for "
                f"--holdout {holdout} --seed {seed}. Rerun with the old values, or pass a new --name for a new split")
        saved = read_split(paths)
        placed = dict(zip(saved["id"], saved["split"]))
        table = table.copy()
        table["split"] = [placed.get(i, s) for i, s in zip(table["id"], table["split"])]
        new = table["split"].isna() & table["label"].notna()
        if new.any():
            # New labelled images join the holdout by a seeded hash of their id: stable, no reshuffle of old rows.
            table.loc[new, "split"] = ["holdout" if _hash_fraction(i, seed) < holdout else "train"
                                       for i in table.loc[new, "id"]]
            print(f"{int(new.sum())} new labelled images placed in the split by seeded hash")
        table.loc[table["label"].isna(), "split"] = "test"
        merged = pd.concat([saved, table[~table["id"].isin(saved["id"])][["id", "split", "label"]]], ignore_index=True)
    else:
        table = assign_holdout(table, holdout, seed)
        merged = table[["id", "split", "label"]]
    meta = {
        "name": paths.name, "data": str(Path(data).resolve()), "layout": layout, **params,
        "classes": sorted(merged["label"].dropna().unique().tolist()),
    }
    if table.attrs.get("class_folders"):  # class name -> original folder (WordNet id kept here only)
        meta["class_folders"] = table.attrs["class_folders"]
    sample = Path(data) / "sample_submission.csv"
    meta["sample_submission"] = str(sample.resolve()) if sample.is_file() else None
    return SplitPlan(table, merged, meta)


def read_split(paths: DatasetPaths) -> pd.DataFrame:
    """split.csv as a table of id, split, label (label empty for test rows)."""
    if not paths.split_csv.exists():
        raise FeatstackError(f"{paths.split_csv} not found; run extract_features.py for this dataset first")
    split = pd.read_csv(paths.split_csv, dtype=str, keep_default_na=False)
    split["label"] = pd.Series([l or None for l in split["label"]], index=split.index, dtype=object)
    return split


def read_dataset_meta(paths: DatasetPaths) -> dict:
    if not paths.dataset_json.exists():
        raise FeatstackError(f"{paths.dataset_json} not found; run extract_features.py for this dataset first")
    return json.loads(paths.dataset_json.read_text())
