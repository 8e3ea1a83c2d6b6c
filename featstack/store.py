"""HDF5 feature store: one file per backbone configuration, written as atomic shards and merged atomically."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from .errors import FeatstackError
from .paths import DatasetPaths

COPY_ROWS = 8192  # rows copied per block when merging: bounded memory whatever the dataset size
STR = h5py.string_dtype("utf-8")


@dataclass
class Entry:
    """A loaded feature file: ids and (n, d) float32 features in the same row order, and how they were made."""

    path: Path
    ids: np.ndarray
    features: np.ndarray
    attrs: dict

    @property
    def backbone(self) -> str:
        return self.attrs["backbone"]


def _write_h5(path: Path, ids: list[str], blocks, width: int, attrs: dict) -> None:
    """Write a feature file through a temporary name, then rename: a reader sees all of it or none."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=STR)
            ds = f.create_dataset("features", shape=(len(ids), width), dtype="float32")
            row = 0
            for block in blocks:
                ds[row:row + len(block)] = block
                row += len(block)
            if row != len(ids):
                raise RuntimeError(f"wrote {row} feature rows for {len(ids)} ids")
            f.attrs.update({k: v for k, v in attrs.items() if v is not None})
            f.attrs["rows"] = len(ids)
            f.attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            f.flush()
            os.fsync(f.id.get_vfd_handle())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_ids(path: Path) -> list[str]:
    with h5py.File(path, "r") as f:
        return list(f["ids"].asstr()[:])


def read_entry(path: str | Path) -> Entry:
    """A whole feature file, or a one-line error naming it when it is corrupt or half written."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            ids = np.asarray(f["ids"].asstr()[:], dtype=object)
            features = f["features"][:]
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    except Exception as exc:
        raise FeatstackError(f"{path}: corrupt or unreadable feature file ({str(exc).splitlines()[0][:120]}); delete it "
                             "and rerun extract_features.py to rebuild it") from None
    if features.ndim != 2 or len(ids) != len(features) or attrs.get("rows") != len(ids):
        raise FeatstackError(f"{path}: ids and features disagree ({len(ids)} ids, shape {features.shape}); delete it "
                             "and rerun extract_features.py")
    return Entry(path, ids, features, attrs)


def read_attrs(path: Path) -> dict:
    try:
        with h5py.File(path, "r") as f:
            return {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    except Exception as exc:
        raise FeatstackError(f"{path}: corrupt or unreadable feature file ({str(exc).splitlines()[0][:120]}); delete it "
                             "and rerun extract_features.py to rebuild it") from None


class EntryWriter:
    """Appends features of one backbone configuration: shards as it goes, one merged file at the end."""

    def __init__(self, paths: DatasetPaths, entry: str, attrs: dict, shard_rows: int = 1024):
        self.final = paths.entry_file(entry)
        self.shards = paths.entry_shards(entry)
        self.attrs = attrs
        self.shard_rows = shard_rows
        self._ids: list[str] = []
        self._blocks: list[np.ndarray] = []
        self.written = 0

    def _shard_files(self) -> list[Path]:
        return sorted(self.shards.glob("*.h5")) if self.shards.is_dir() else []

    def done_ids(self) -> set[str]:
        """Ids already stored, in the merged file or in shards a killed run left behind."""
        done = set(read_ids(self.final)) if self.final.exists() else set()
        for shard in self._shard_files():
            done.update(read_ids(shard))
        return done

    def add(self, ids: list[str], features: np.ndarray) -> None:
        self._ids.extend(ids)
        self._blocks.append(features)
        if len(self._ids) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self._ids:
            return
        self.shards.mkdir(parents=True, exist_ok=True)
        width = self._blocks[0].shape[1]
        # The rename is the shard's completion marker: a run killed mid-write leaves only a stray .tmp.
        _write_h5(self.shards / f"{time.time_ns():020d}.h5", self._ids, self._blocks, width, {})
        self.written += len(self._ids)
        self._ids, self._blocks = [], []

    def merge(self) -> int:
        """Fold the merged file and every shard into a new merged file; returns its row count."""
        self.flush()
        shards = self._shard_files()
        if not shards:
            return len(read_ids(self.final)) if self.final.exists() else 0
        sources = ([self.final] if self.final.exists() else []) + shards
        ids: list[str] = []
        width = None
        for src in sources:
            with h5py.File(src, "r") as f:
                ids.extend(f["ids"].asstr()[:])
                width = f["features"].shape[1]

        def blocks():
            for src in sources:
                with h5py.File(src, "r") as f:
                    ds = f["features"]
                    for start in range(0, len(ds), COPY_ROWS):
                        yield ds[start:start + COPY_ROWS]

        attrs = dict(self.attrs)
        if self.final.exists():
            attrs["created"] = read_attrs(self.final).get("created", attrs.get("created"))
        _write_h5(self.final, ids, blocks(), width, attrs)
        for shard in shards:
            shard.unlink()
        with contextlib.suppress(OSError):
            self.shards.rmdir()
        return len(ids)


@contextlib.contextmanager
def writer_lock(paths: DatasetPaths):
    """One writer per dataset store: a second run fails at once instead of interleaving shards."""
    paths.root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(paths.lock_file), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FeatstackError(f"{paths.root} is being written by another extract_features.py run (lock "
                             f"{paths.lock_file}); wait for it to finish") from None
    try:
        yield
    finally:
        lock.release()
