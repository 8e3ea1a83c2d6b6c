"""Load cached features of chosen backbones, joined on id (never on row position), with split and labels."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from .errors import FeatstackError
from .layouts import class_order
from .paths import DatasetPaths
from .split import read_dataset_meta, read_split
from .store import read_attrs, read_entry, rebuild_command, stack_names

EXCLUDE_MAX_BYTES = 16 * 2**20  # --exclude: 16 MiB holds a few hundred thousand ids, more than any real list
# Attributes that must agree across backbones stacked together; input size and weights file differ by design.
MUST_AGREE = ("pooling", "tta", "precision")
# A hub encoder's own readout (class token, image embedding) is its default, not a choice that could disagree.
OWN_READOUTS = ("token", "pooled")


def _own_readout(attrs) -> bool:
    """An encoder's or a model file's own readout (its own head's pooling, a vector layer), not a --pooling choice
    that could disagree with the other backbones'."""
    return attrs.get("pooling") in OWN_READOUTS or attrs.get("readout") == "layer"


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
    bad_left_out: int = 0  # labelled ids listed in bad_images.csv, left out of training and holdout
    # Test ids listed in bad_images.csv: no features, but a submission needs a row for each of them.
    unfeatured_test_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))

    @property
    def random_weights(self) -> bool:
        """Whether these features come from randomly initialised backbones (a smoke test or the offline demo)."""
        return any(e.get("weights") == "random" for e in self.entries.values())

    def bad_images_note(self) -> str | None:
        """One line saying how many undecodable images were left out, or None when there were none."""
        if not self.bad_left_out and not len(self.unfeatured_test_ids):
            return None
        count = self.bad_left_out + len(self.unfeatured_test_ids)
        note = (f"note: {count} images listed in {self.paths.bad_images_csv} (could not be decoded) have no "
                f"features: {self.bad_left_out} left out of training and holdout")
        if len(self.unfeatured_test_ids):
            note += f", {len(self.unfeatured_test_ids)} test images predicted as the training class frequencies"
        return note

    @property
    def classes(self) -> list[str]:
        return class_order(self.labels)

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
            raise FeatstackError(f"--backbones: {name!r} is cached in {len(files)} configurations; "
                                 f"name one by its file stem: {', '.join(p.stem for p in files)}")
        backbone = next(b for b, ps in cached.items() if files[0] in ps)
        if backbone in chosen and chosen[backbone] != files[0]:
            # Columns, members and predict.py's rebuild are keyed by backbone: a second configuration would
            # silently replace the first.
            raise FeatstackError(f"--backbones: {chosen[backbone].stem} and {files[0].stem} are two configurations "
                                 f"of {backbone}; stack one of them")
        chosen[backbone] = files[0]
    return chosen


def read_bad_ids(paths: DatasetPaths) -> set[str]:
    """Ids that extraction could not decode (bad_images.csv); empty when the file is absent."""
    if not paths.bad_images_csv.exists():
        return set()
    try:
        bad = pd.read_csv(paths.bad_images_csv, dtype=str, keep_default_na=False)
        return set(bad["id"])
    except (ValueError, KeyError, OSError) as exc:
        raise FeatstackError(f"{paths.bad_images_csv}: unreadable ({str(exc).splitlines()[0][:80]}); rerun "
                             "extract_features.py on this dataset to rewrite it") from None


def extraction_running(paths: DatasetPaths) -> bool:
    """Whether an extract_features.py run holds this dataset's lock right now."""
    if not paths.lock_file.exists():
        return False
    lock = FileLock(str(paths.lock_file), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    except OSError:
        return False  # a read-only store (e.g. a Kaggle input dataset) cannot be being written
    lock.release()
    return False


def load_features(features: str | Path, backbones: list[str] | None = None, allow_missing: bool = False) -> FeatureSet:
    paths = DatasetPaths(Path(features))
    if not paths.root.is_dir():
        raise FeatstackError(f"--features {features}: no such folder; pass a dataset folder under features/")
    split = read_split(paths)
    meta = read_dataset_meta(paths)
    entries = {name: read_entry(path) for name, path in _choose(paths, backbones).items()}
    for key in MUST_AGREE:
        values = {name: e.attrs.get(key) for name, e in entries.items()
                  if not (key == "pooling" and _own_readout(e.attrs))}
        if len(set(values.values())) > 1:
            raise FeatstackError(f"refusing to mix feature files made with different {key}: "
                                 f"{', '.join(f'{n}={v}' for n, v in values.items())}; choose matching --backbones")
    kinds = {name: e.attrs.get("weights") == "random" for name, e in entries.items()}
    if len(set(kinds.values())) > 1:
        names = stack_names({p: b for b, ps in cached_backbones(paths).items() for p in ps})
        group = {kind: ",".join(names[e.path] for n, e in entries.items() if kinds[n] == kind)
                 for kind in (True, False)}
        raise FeatstackError(f"refusing to mix random-weight and trained-weight features: random weights: "
                             f"{group[True]}; trained weights: {group[False]}; stack one group at a time: "
                             f"--backbones {group[False]} (trained) or --backbones {group[True]} (random)")
    for e in entries.values():
        finite = np.isfinite(e.features).all(axis=1)
        if not finite.all():
            raise FeatstackError(
                f"{e.path}: {int((~finite).sum())} of {len(finite)} rows hold non-finite features (inf or NaN; first "
                f"id {e.ids[~finite][0]!r}), which no model can use; re-extract: {rebuild_command(e.path)} (it "
                "extracts those photos again and lists the ones that stay non-finite in bad_images.csv)")
    split_ids = split["id"].to_numpy(object)
    bad_ids = read_bad_ids(paths)
    is_bad = np.fromiter((i in bad_ids for i in split_ids), bool, len(split_ids))
    keep = np.ones(len(split_ids), bool)
    rows_of = {}
    for name, e in entries.items():
        if len(e.ids) == len(split_ids) and np.array_equal(e.ids, split_ids):
            rows_of[name] = None  # already in split order: no copy of the matrix
            continue
        row_of = dict(zip(e.ids, range(len(e.ids))))
        rows = np.fromiter((row_of.get(i, -1) for i in split_ids), np.int64, len(split_ids))
        present = rows >= 0
        # Undecodable images never get features; only ids missing for another reason stop the run.
        unexplained = int((~present & ~is_bad).sum())
        if unexplained and not allow_missing:
            if extraction_running(paths):
                raise FeatstackError(f"{e.path.name}: {unexplained} of {len(split_ids)} ids of split.csv have no "
                                     f"{name} features yet; an extract_features.py run is writing them now (lock "
                                     f"{paths.lock_file}): wait for it to finish, then run stack.py again")
            raise FeatstackError(f"{e.path.name}: {unexplained} of {len(split_ids)} ids of split.csv have "
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
    unfeatured_bad = ~keep & is_bad
    is_test = split["split"].to_numpy(object) == "test"
    split = split[keep].reset_index(drop=True)
    return FeatureSet(paths, meta, split["id"].to_numpy(object), split["split"].to_numpy(object),
                      split["label"].to_numpy(object), blocks,
                      {n: {"file": e.path.name, **e.attrs} for n, e in entries.items()},
                      bad_left_out=int((unfeatured_bad & ~is_test).sum()),
                      unfeatured_test_ids=split_ids[unfeatured_bad & is_test])


def exclude_training_rows(fs: FeatureSet, file: str | Path) -> dict:
    """Take the training rows whose ids a CSV lists (any CSV with an ``id`` column) out of training.

    Holdout and test rows are never excluded, so holdout scores stay comparable across runs. An id that is not in
    the dataset is an error: the file most likely belongs to another dataset.
    """
    path = Path(file)
    try:
        # Read at most EXCLUDE_MAX_BYTES: /dev/zero or a wrong multi-gigabyte file must not fill the memory.
        with open(path, "rb") as f:
            raw = f.read(EXCLUDE_MAX_BYTES + 1)
        if len(raw) > EXCLUDE_MAX_BYTES:
            raise FeatstackError(f"--exclude {file}: larger than {EXCLUDE_MAX_BYTES // 2**20} MiB, far more than a "
                                 "list of ids; pass a CSV with an id column (audit.py's label_issues.csv)")
        table = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise FeatstackError(f"--exclude {file}: no such file") from None
    except IsADirectoryError:
        raise FeatstackError(f"--exclude {file}: a folder; pass a CSV with an id column") from None
    except (ValueError, OSError) as exc:
        raise FeatstackError(f"--exclude {file}: cannot read it as CSV ({str(exc).splitlines()[0][:80]})") from None
    if "id" not in table.columns:
        raise FeatstackError(f"--exclude {file}: needs an id column; found {', '.join(table.columns) or 'no columns'}")
    wanted = set(table["id"])
    unknown = sorted(wanted - set(fs.ids))
    if unknown:
        raise FeatstackError(f"--exclude {file}: {len(unknown)} ids are not in dataset {fs.paths.name} (first: "
                             f"{unknown[0]!r}); pass a CSV of this dataset's ids")
    listed = np.fromiter((i in wanted for i in fs.ids), bool, len(fs.ids))
    train_rows = listed & (fs.split == "train")
    before = set(fs.labels[fs.split == "train"])
    after = set(fs.labels[(fs.split == "train") & ~train_rows])
    if before - after:
        raise FeatstackError(f"--exclude {file}: takes out every training row of class {sorted(before - after)[0]!r}; "
                             "keep at least a few of them")
    fs.split = np.where(train_rows, "excluded", fs.split).astype(object)
    return {"file": str(path.resolve()), "ids": len(wanted), "train_rows": int(train_rows.sum()),
            "holdout_kept": int((listed & (fs.split == "holdout")).sum()),
            "test_kept": int((listed & (fs.split == "test")).sum())}
