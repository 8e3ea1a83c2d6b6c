"""The fixed train / holdout / test split of a dataset: decided once, written to split.csv, reused by every stage."""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from .errors import FeatstackError
from .layouts import class_order
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


def check_holdout(holdout) -> None:
    """--holdout is a fraction in [0, 1): nan, inf and the like are refused before anything is read or written."""
    if not (isinstance(holdout, (int, float)) and math.isfinite(holdout) and 0 <= holdout < 1):
        raise FeatstackError(f"--holdout {holdout}: must be at least 0 and below 1 (the fraction of labelled images "
                             "held out, e.g. 0.1; 0 for none)")


def assign_holdout(table: pd.DataFrame, holdout: float, seed: int) -> pd.DataFrame:
    """Fill the split column: a stratified holdout fraction of the labelled rows not already placed."""
    check_holdout(holdout)
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


def place_new(table: pd.DataFrame, new: pd.Series, holdout: float, seed: int) -> pd.Series:
    """Splits for the new labelled rows ``new`` of a table whose other labelled rows are placed: per class, the
    holdout is topped up to its share of the class (stratified), taking the new ids in seeded-hash order."""
    split = table["split"].copy()
    labelled = table["label"].notna()
    for label, rows in table[new].groupby("label").groups.items():
        of_class = labelled & table["label"].eq(label)
        held = int((of_class & ~new & split.eq("holdout")).sum())
        wanted = min(len(rows), max(0, round(holdout * int(of_class.sum())) - held))
        order = sorted(rows, key=lambda r: _hash_fraction(table.at[r, "id"], seed))
        split.loc[order[:wanted]] = "holdout"
        split.loc[order[wanted:]] = "train"
    return split


def reconcile(saved: pd.DataFrame, table: pd.DataFrame, holdout: float, seed: int) -> pd.DataFrame:
    """The layout's table with its split, following the data since split.csv was written: labels as the layout has
    them now, ids the layout no longer has left out, new ids placed; an unchanged id keeps its split. Prints one
    line per kind of change."""
    table = table.copy()
    old_label = dict(zip(saved["id"], saved["label"]))
    old_split = dict(zip(saved["id"], saved["split"]))
    known = table["id"].isin(old_split)
    now = [None if pd.isna(l) else l for l in table.loc[known, "label"]]
    changed = [(i, old_label[i], new) for i, new in zip(table.loc[known, "id"], now) if old_label[i] != new]
    # Saved splits hold where the layout fixes none, and for labelled ids that were labelled before (relabelled
    # ids keep their side too); an id that gained a label joins as a new one, one that lost it becomes test.
    keep = known & table["split"].isna() & table["label"].notna()
    was_labelled = [old_label.get(i) is not None for i in table["id"]]
    keep &= pd.Series(was_labelled, index=table.index)
    table.loc[keep, "split"] = [old_split[i] for i in table.loc[keep, "id"]]
    new = table["split"].isna() & table["label"].notna()
    table["split"] = place_new(table, new, holdout, seed)
    table.loc[table["label"].isna(), "split"] = "test"
    gone = saved.loc[~saved["id"].isin(set(table["id"])), "id"].tolist()
    if changed:
        i, before, after = changed[0]
        print(f"{len(changed)} label{'s' if len(changed) != 1 else ''} changed since the last run (first: {i} "
              f"{before or '(test)'} → {after or '(test)'}); labelled images keep their side of the split")
    if gone:
        print(f"{len(gone)} image{'s' if len(gone) != 1 else ''} gone since the last run (first: {gone[0]}); "
              "left out of split.csv (their cached features stay in the store, unused)")
    added = ~known
    if added.any():
        held = int((added & table["split"].eq("holdout")).sum())
        tests = int((added & table["split"].eq("test")).sum())
        print(f"{int(added.sum())} new image{'s' if int(added.sum()) != 1 else ''} since the last run: "
              f"{int(added.sum()) - held - tests} train, {held} holdout (stratified by class), {tests} test")
    return table


@dataclass
class SplitPlan:
    """The split a run will use, decided in memory: written only once the run can go ahead."""

    table: pd.DataFrame  # the run's table with its split column filled
    saved: pd.DataFrame  # split.csv's rows: the ids of the layout now, with their split and label
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
    """The table with its split: decided on the first run, then reconciled with the layout on every later one."""
    params = {"holdout": holdout, "seed": seed}
    data_path = str(Path(data).resolve())
    if paths.split_csv.exists() and paths.dataset_json.exists():
        meta = read_dataset_meta(paths)
        if meta.get("data") and meta["data"] != data_path:
            raise FeatstackError(
                f"--name {paths.name}: {paths.root} holds the features of {meta['data']}, not of {data_path}; pass "
                f"another --name for this folder, or delete {paths.root} to rebuild the store for it (if the same data "
                f"only moved, set \"data\" in {paths.dataset_json} to its new path)")
        old = {k: meta.get(k) for k in params}
        if old != params:
            raise FeatstackError(
                f"{paths.split_csv} was made with --holdout {old['holdout']} --seed {old['seed']}; this run asks for "
                f"--holdout {holdout} --seed {seed}. Rerun with the old values, or pass a new --name for a new split")
        table = reconcile(read_split(paths), table, holdout, seed)
    else:
        table = assign_holdout(table, holdout, seed)
    # split.csv keeps its row order: the ids it held, then the new ones in the layout's order.
    position = {i: k for k, i in enumerate(read_split(paths)["id"])} if paths.split_csv.exists() else {}
    rank = [position.get(i, len(position) + k) for k, i in enumerate(table["id"])]
    saved = table[["id", "split", "label"]].iloc[np.argsort(rank, kind="stable")].reset_index(drop=True)
    meta = {
        "name": paths.name, "data": data_path, "layout": layout, **params,
        "classes": class_order(saved["label"].dropna()),
    }
    if table.attrs.get("class_folders"):  # class name -> original folder (WordNet id kept here only)
        meta["class_folders"] = table.attrs["class_folders"]
    sample = Path(data) / "sample_submission.csv"
    meta["sample_submission"] = str(sample.resolve()) if sample.is_file() else None
    return SplitPlan(table, saved, meta)


SPLIT_COLUMNS = ("id", "split", "label")


def read_split(paths: DatasetPaths) -> pd.DataFrame:
    """split.csv as a table of id, split, label (label empty for test rows), read strictly: every stage reads it
    here, and a hand edit that would silently drop rows (``Train``) or count an image twice (an id listed twice) is
    refused in one line naming the line and the fix."""
    where = paths.split_csv
    if not where.exists():
        raise FeatstackError(f"{where} not found; run extract_features.py for this dataset first")
    fix = f"fix the line, or delete {where} and rerun extract_features.py to decide a new split"
    try:
        text = where.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = where.read_bytes()[:exc.start].count(b"\n") + 1
        raise FeatstackError(f"{where}: line {line}: not UTF-8 text; save it as UTF-8, or {fix}") from None
    except OSError as exc:
        raise FeatstackError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    if not text.strip():
        raise FeatstackError(f"{where}: empty; delete it and rerun extract_features.py to decide a new split")
    try:
        split = pd.read_csv(io.StringIO(text.lstrip("\ufeff")), dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as exc:
        raise FeatstackError(f"{where}: cannot read it as CSV ({str(exc).splitlines()[0][:100]}); {fix}") from None
    if sorted(split.columns) != sorted(SPLIT_COLUMNS):
        raise FeatstackError(f"{where}: line 1: the header must be {','.join(SPLIT_COLUMNS)}, found "
                             f"{','.join(split.columns)[:80]!r}; restore that header line")

    def refuse(bad, what) -> None:
        if bad.any():
            k = int(np.asarray(bad).argmax())
            raise FeatstackError(f"{where}: line {k + 2}: {what(split.iloc[k])}")  # the header is line 1

    refuse(~split["split"].isin(SPLITS), lambda r: f"split {r['split']!r} of id {r['id']!r} is not one of "
                                               f"{', '.join(SPLITS)} (lower case); {fix}")
    refuse(split["id"].eq(""), lambda r: f"empty id; {fix}")
    refuse(split["split"].eq("test") == split["label"].ne(""),
           lambda r: ("a test row has a label" if r["label"] else f"a {r['split']} row has no label")
           + f" (id {r['id']!r}); test rows are the unlabelled ones; {fix}")
    # Every id once: an id listed twice lands in both the out-of-fold and the holdout predictions.
    first_line = split["id"].map(dict(zip(split["id"][::-1], range(len(split) + 1, 1, -1))))
    refuse(split["id"].duplicated(), lambda r: f"id {r['id']!r} is listed again (first on line "
                                               f"{first_line[r.name]}); an image has one side of the split: remove "
                                               "one of the two lines")
    split["label"] = pd.Series([l or None for l in split["label"]], index=split.index, dtype=object)
    return split


def read_dataset_meta(paths: DatasetPaths) -> dict:
    """dataset.json, read strictly: empty or invalid JSON is one line naming the line and the fix."""
    where = paths.dataset_json
    if not where.exists():
        raise FeatstackError(f"{where} not found; run extract_features.py for this dataset first")
    # Without dataset.json the next extraction decides the split afresh; cached features are kept by id.
    fix = "restore it, or delete it and rerun extract_features.py (the split is decided again, features stay cached)"
    try:
        meta = json.loads(where.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise FeatstackError(f"{where}: not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as exc:
        what = "empty" if not exc.doc.strip() else f"line {exc.lineno}: invalid JSON ({exc.msg})"
        raise FeatstackError(f"{where}: {what}; {fix}") from None
    except OSError as exc:
        raise FeatstackError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    if not isinstance(meta, dict):
        raise FeatstackError(f"{where}: line 1: not a JSON object ({type(meta).__name__}); {fix}")
    # Every extraction writes these; without them the split check read "--holdout None" and stack.py recorded no
    # layout, so submit.py's auto format fell back to generic on a cats-dogs or dog-breed dataset.
    missing = [k for k in ("layout", "holdout", "seed") if k not in meta]
    if missing:
        raise FeatstackError(f"{where}: no {', '.join(repr(k) for k in missing)} (not what extract_features.py "
                             f"writes); {fix}")
    return meta
