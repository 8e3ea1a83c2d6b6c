"""HDF5 feature store: a checksummed file per backbone configuration, written as atomic shards, merged idempotently."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shlex
import stat as stat_module
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from .errors import FeatstackError
from .paths import DatasetPaths

COPY_ROWS = 8192  # rows copied per block when merging: bounded memory whatever the dataset size
CHUNK_BYTES = 1 << 20  # feature chunks of whole rows, about 1 MiB: HDF5's default chunk cache holds one
STR = h5py.string_dtype("utf-8")
MERGED_SHARDS = "merged_shards"  # names of the shards the last merge absorbed: a rerun deletes them, never re-adds them
# Per row, the sha256 of the photo's bytes its vector was made from: a photo replaced under the same name no longer
# matches its row, so it is extracted again. "" marks a row of unknown content (written before this existed).
CONTENT = "content"
ATTRS_SHA256 = "attrs_sha256"  # checksum of the attributes, stored beside them: HDF5 checks only the chunks
# Bookkeeping attributes that decide no result (rows is checked against the data itself): not in the checksum.
UNCHECKED_ATTRS = ("rows", "updated", "created", "extract_seconds", ATTRS_SHA256, "file")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether an error (or one it was raised from) is a full disk or an exhausted quota."""
    while exc is not None:
        if isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT)
                                         or "No space left on device" in str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(folder: Path, name: str) -> FeatstackError:
    return FeatstackError(f"{folder}: no space left on device while writing {name} (nothing half-written is kept); "
                          "free space there and rerun: the work finished so far is kept")


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


class _DiskWriter:
    """The file object HDF5 writes through: the first failed write (a full disk) is kept and the rest discarded.

    HDF5's own driver, after ENOSPC, leaves the file open with unwritable metadata, and the interpreter crashes when
    it exits; through this object HDF5 always closes cleanly and the caller raises the kept error instead.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.failure: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.failure is None:
            try:
                done = 0
                while done < len(view):
                    done += os.write(self.fd, view[done:])
            except OSError as exc:
                self.failure = exc
        return len(view)

    def readinto(self, buffer) -> int:
        return os.readv(self.fd, [buffer])

    def read(self, size: int = -1) -> bytes:
        return os.read(self.fd, size if size >= 0 else os.fstat(self.fd).st_size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self.fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def truncate(self, size: int | None = None) -> int:
        size = self.tell() if size is None else size
        if self.failure is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as exc:
                self.failure = exc
        return size

    def flush(self) -> None:
        pass

    def sync(self) -> None:
        if self.failure is None:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                self.failure = exc


def _strings(values: list[str]) -> np.ndarray:
    """Fixed-length UTF-8 strings: they live inside the dataset's chunks, so the chunk checksum covers them."""
    encoded = [str(v).encode("utf-8") for v in values]
    return np.array(encoded, dtype=h5py.string_dtype("utf-8", max(1, max(map(len, encoded), default=1))))


def _write_h5(path: Path, ids: list[str], blocks, width: int, attrs: dict, merged_shards: list[str] = (),
              content: list[str] | None = None) -> None:
    """Write a feature file through a temporary name, then rename: a reader sees all of it or none.

    ``ids`` and ``features`` are chunked with HDF5's fletcher32 checksum, so a damaged chunk fails on read.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            sink = _DiskWriter(fd)
            with h5py.File(sink, "w") as f:
                f.create_dataset("ids", data=_strings(ids), chunks=True, fletcher32=True)
                f.create_dataset(CONTENT, data=_strings(content if content is not None else [""] * len(ids)),
                                 chunks=True, fletcher32=True)
                rows = max(1, min(len(ids), CHUNK_BYTES // (4 * max(1, width))))
                ds = f.create_dataset("features", shape=(len(ids), width), dtype="float32",
                                      chunks=(rows, width) if len(ids) else True, fletcher32=True)
                row = 0
                for block in blocks:
                    ds[row:row + len(block)] = block
                    row += len(block)
                    if sink.failure is not None:
                        break
                if sink.failure is None and row != len(ids):
                    raise RuntimeError(f"wrote {row} feature rows for {len(ids)} ids")
                f.create_dataset(MERGED_SHARDS, data=_strings(list(merged_shards)))
                f.attrs.update({k: v for k, v in attrs.items() if v is not None})
                f.attrs["rows"] = len(ids)
                f.attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                f.attrs[ATTRS_SHA256] = attrs_checksum(_attrs_of(f))  # of the values as a reader gets them back
            sink.sync()
        finally:
            os.close(fd)
        if sink.failure is not None:
            raise sink.failure
        os.replace(tmp, path)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(path.parent, path.name) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def read_ids(path: Path) -> list[str]:
    with h5py.File(path, "r") as f:
        return list(f["ids"].asstr()[:])


def read_rows(path: Path) -> tuple[list[str], list[str]]:
    """A feature file's ids and, per row, the sha256 of the photo it was made from ("" when not recorded)."""
    with h5py.File(path, "r") as f:
        ids = list(f["ids"].asstr()[:])
        content = list(f[CONTENT].asstr()[:]) if CONTENT in f else [""] * len(ids)
    return ids, content


def _attrs_of(f: h5py.File) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}


def attrs_checksum(attrs: dict) -> str:
    """sha256 of every attribute that decides a result, as canonical JSON."""
    decided = {k: v for k, v in attrs.items() if k not in UNCHECKED_ATTRS}
    return hashlib.sha256(json.dumps(decided, sort_keys=True, default=str).encode()).hexdigest()


def _name_digest(path: Path) -> str | None:
    """The identity digest a cache entry's file name ends with (``..._1a2b3c4d``), or None for other names."""
    match = re.search(r"_([0-9a-f]{8})$", Path(path).stem)
    return match.group(1) if match else None


def attrs_damage(name: str | Path, attrs: dict) -> str | None:
    """Why a feature file's attributes (or a run's copy of them) cannot be trusted, or None when they verify.

    Checked against the checksum stored beside them; files written before there was one (legacy) are checked
    against the digest their file name ends with, which covers every attribute that changes the vectors.
    """
    stored = attrs.get(ATTRS_SHA256)
    if stored is not None and stored != attrs_checksum(attrs):
        return "its attributes do not match their checksum"
    digest = _name_digest(Path(name))
    if digest and attrs.get("backbone"):
        from .backbones import identity_digest, identity_of
        if identity_digest(identity_of(attrs)) != digest:
            return "its attributes do not match the digest in its file name"
    return None


def _check_attrs(path: Path, attrs: dict) -> dict:
    damage = attrs_damage(path, attrs)
    if damage:
        raise ValueError(damage)
    return attrs


def _attrs_from_name(path: Path) -> dict:
    """What a cache entry's name says of it: ``<backbone>_<size>_<pooling>[_flip]_<weights>_<digest>``."""
    parts = Path(path).stem.split("_")
    if len(parts) < 5:
        return {}
    flip = parts[-3] == "flip"
    at = len(parts) - (5 if flip else 4)
    if at < 1 or not parts[at].isdigit():
        return {}
    out = {"backbone": "_".join(parts[:at]), "input_size": int(parts[at]), "pooling": parts[at + 1],
           "tta": "flip" if flip else "none"}
    if re.fullmatch(r"random\d+", parts[-2]):
        out["weights"] = "random"
    return out


def rebuild_command(path: Path) -> str:
    """The extract_features.py command line that rebuilds a feature file, as exactly as the store records it."""
    root = path.parent
    args = ["python", "extract_features.py"]
    try:
        meta = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError):
        meta = {}
    args += ["--data", meta.get("data") or "DATA", "--features-dir", str(root.parent), "--name", root.name]
    if meta.get("holdout", 0.1) != 0.1:
        args += ["--holdout", str(meta["holdout"])]
    if meta.get("seed", 0) != 0:
        args += ["--seed", str(meta["seed"])]
    try:
        with h5py.File(path, "r") as f:
            attrs = _attrs_of(f)
    except Exception:
        attrs = {}
    if attrs and attrs_damage(path, attrs):  # damaged attributes: the file name says what to rebuild
        named = _attrs_from_name(path)
        attrs = {**attrs, **named} if named else {}
    if not attrs.get("backbone"):
        return shlex.join(args) + " with the --backbones, --weights and --image-size that made it"
    weights = attrs.get("weights")
    model = attrs.get("model_path")
    layer = f":{attrs['layer']}" if attrs.get("layer") else ""
    preset = attrs.get("preset")
    args += ["--backbones", model + layer if model else "hub:" + preset if preset else attrs["backbone"]]
    if weights == "random":
        args += ["--weights", "random"]
    elif weights == "dir" and attrs.get("weights_file"):
        args += ["--weights", str(Path(attrs["weights_file"]).parent)]
    if model:
        args += ["--preprocess", str(attrs.get("preprocess"))]
    if attrs.get("input_size") and not preset:  # a preset's converter decides its size
        args += ["--image-size", str(attrs["input_size"])]
    for option, key, default in (("--pooling", "pooling", "token" if preset else "avg"), ("--tta", "tta", "none"),
                                 ("--precision", "precision", "float32")):
        if attrs.get(key, default) != default:
            args += [option, str(attrs[key])]
    return shlex.join(args)


def _damaged(path: Path, exc: Exception) -> FeatstackError:
    cause = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
    return FeatstackError(f"{path}: damaged or unreadable feature file ({cause}); rebuild it with: "
                          f"{rebuild_command(path)} (the run moves the damaged file aside)")


def read_entry(path: str | Path) -> Entry:
    """A whole feature file, or a one-line error naming it and the command that rebuilds it (checksums are verified)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            ids = np.asarray(f["ids"].asstr()[:], dtype=object)
            features = f["features"][:]
            attrs = _check_attrs(path, _attrs_of(f))
    except Exception as exc:
        raise _damaged(path, exc) from None
    if features.ndim != 2 or len(ids) != len(features) or attrs.get("rows") != len(ids):
        raise _damaged(path, ValueError(f"{len(ids)} ids, features {features.shape}, rows={attrs.get('rows')}"))
    if attrs.get("width") and attrs["width"] != features.shape[1]:
        raise _damaged(path, ValueError(f"width {attrs['width']} but features of shape {features.shape}"))
    return Entry(path, ids, features, attrs)


def read_attrs(path: Path) -> dict:
    try:
        with h5py.File(path, "r") as f:
            return _check_attrs(path, _attrs_of(f))
    except Exception as exc:
        raise _damaged(path, exc) from None


def verify(path: Path) -> np.ndarray:
    """Read every chunk of a feature file (bounded memory), so HDF5 checks each checksum; raise when any fails.

    Returns which rows are finite: a row of inf or NaN (stored before extraction refused them) is not a feature.
    """
    with h5py.File(path, "r") as f:
        ids = f["ids"]
        ids[:]
        if CONTENT in f and len(f[CONTENT]) != len(ids):
            raise ValueError(f"{len(ids)} ids, {len(f[CONTENT])} content hashes")
        if CONTENT in f:
            f[CONTENT][:]
        ds = f["features"]
        if ds.ndim != 2 or len(ds) != len(ids) or f.attrs.get("rows", len(ids)) != len(ids):
            raise ValueError(f"{len(ids)} ids, features of shape {ds.shape}")
        attrs = _check_attrs(path, _attrs_of(f))
        if attrs.get("width") and attrs["width"] != ds.shape[1]:
            raise ValueError(f"width {attrs['width']} but features of shape {ds.shape}")
        return finite_rows(ds)


def finite_rows(ds) -> np.ndarray:
    """Which rows of an (n, d) feature dataset hold only finite values, read in blocks: bounded memory."""
    finite = np.ones(len(ds), dtype=bool)
    for start in range(0, len(ds), COPY_ROWS):
        finite[start:start + COPY_ROWS] = np.isfinite(ds[start:start + COPY_ROWS]).all(axis=1)
    return finite


def move_aside(path: Path) -> Path:
    """Rename a damaged file to ``<name>.corrupt`` (numbered when one exists), out of every reader's way."""
    target = path.with_name(path.name + ".corrupt")
    k = 1
    while target.exists():
        target, k = path.with_name(f"{path.name}.corrupt{k}"), k + 1
    os.replace(path, target)
    return target


def remove_stray_tmp(paths: DatasetPaths) -> int:
    """Delete the temporary files of writes a killed run left behind (call it holding the writer lock)."""
    strays = list(paths.root.glob(".*.tmp*")) + list(paths.root.glob(".shards/*/.*.tmp*"))
    for stray in strays:
        stray.unlink(missing_ok=True)
    return len(strays)


class EntryWriter:
    """Appends features of one backbone configuration: shards as it goes, one merged file at the end.

    ``content`` maps an id to the sha256 of its photo's bytes now (ids it lacks: unknown). A row counts as this
    photo's features only while its recorded sha256 matches: a replaced photo is extracted again and its old row
    dropped at the merge. Rows of unknown content (stores written before rows recorded it) are taken as the photo's
    current content once, and recorded so by the merge.
    """

    def __init__(self, paths: DatasetPaths, entry: str, attrs: dict, shard_rows: int = 1024,
                 content: dict[str, str] | None = None):
        self.final = paths.entry_file(entry)
        self.shards = paths.entry_shards(entry)
        self.attrs = attrs
        self.shard_rows = shard_rows
        self.content = content or {}
        self._ids: list[str] = []
        self._blocks: list[np.ndarray] = []
        self._finite: dict[Path, np.ndarray] = {}  # per source file, its finite rows (verify() read them anyway)
        self.written = 0
        self.changed: set[str] = set()  # ids whose stored rows were made from other bytes than the photo's now
        self.nonfinite: set[str] = set()  # ids whose only stored rows are inf or NaN

    def _shard_files(self) -> list[Path]:
        return sorted(self.shards.glob("*.h5")) if self.shards.is_dir() else []

    def _merged_shards(self) -> set[str]:
        if not self.final.exists():
            return set()
        with h5py.File(self.final, "r") as f:
            return set(f[MERGED_SHARDS].asstr()[:]) if MERGED_SHARDS in f else set()

    def recover(self) -> set[str]:
        """Make the store this entry left trustworthy, then return the ids it holds current features of.

        A damaged file (a checksum or structure that fails) is moved aside to ``*.corrupt`` and its ids are
        extracted again; shards the merged file already absorbed (a merge killed before it deleted them) are
        deleted; ids stored twice with different features from the same bytes are refused (identical copies are
        dropped by merge). Rows of a photo's earlier bytes, and rows of inf or NaN, do not count: their ids are
        extracted again and the merge drops those rows.
        """
        for path in ([self.final] if self.final.exists() else []) + self._shard_files():
            try:
                self._finite[path] = verify(path)
            except Exception as exc:
                cause = (str(exc).splitlines() or [type(exc).__name__])[0][:100]
                moved = move_aside(path)
                print(f"{path}: damaged feature file ({cause}); moved aside to {moved.name}, its features are "
                      "extracted again", file=sys.stderr)
        self._drop_shards([s for s in self._shard_files() if s.name in self._merged_shards()])
        by_source = self._rows_by_source()
        keep = self._keep_masks(by_source)  # refuses differing duplicates before any work is done
        held = {i for src, (ids, _) in by_source.items() for i, k in zip(ids, keep.masks[src]) if k}
        self.changed = keep.stale - held
        self.nonfinite = keep.nonfinite - held - self.changed
        if self.nonfinite:
            print(f"{self.final}: {len(self.nonfinite)} photos have only non-finite features (inf or NaN) stored, "
                  "written before extraction refused them; they are extracted again", file=sys.stderr)
        return held

    def _rows_by_source(self) -> dict[Path, tuple[list[str], list[str]]]:
        sources = ([self.final] if self.final.exists() else []) + self._shard_files()
        return {src: read_rows(src) for src in sources}

    def _finite_rows(self, src: Path) -> np.ndarray:
        if src not in self._finite:
            with h5py.File(src, "r") as f:
                self._finite[src] = finite_rows(f["features"])
        return self._finite[src]

    def _keep_masks(self, by_source: dict[Path, tuple[list[str], list[str]]]) -> _Keep:
        """Which rows of each source a merge keeps: per id, the first finite row made from the photo's bytes now
        (for ids not in the table, the newest bytes stored). Later copies from the same bytes must be identical."""
        wanted: dict[str, str] = {}
        for ids, content in by_source.values():  # oldest source first: the newest copy is the last one seen
            wanted.update(zip(ids, content))
        wanted.update({i: c for i, c in self.content.items() if i in wanted})
        exact = {i for src, (ids, content) in by_source.items()
                 for i, c, ok in zip(ids, content, self._finite_rows(src)) if ok and c and c == wanted[i]}
        first: dict[str, tuple[Path, int]] = {}
        dups: list[tuple[str, Path, int]] = []
        keep = _Keep()
        for src, (ids, content) in by_source.items():
            mask = np.zeros(len(ids), dtype=bool)
            for row, (i, c, ok) in enumerate(zip(ids, content, self._finite_rows(src))):
                if not ok:
                    keep.nonfinite.add(i)
                elif c != wanted[i] and (c or i in exact):  # a row of unknown bytes is adopted when none matches
                    keep.stale.add(i)
                elif i in first:
                    dups.append((i, src, row))
                else:
                    first[i] = (src, row)
                    mask[row] = True
                    keep.unstamped += not c and bool(self.content.get(i))
            keep.masks[src] = mask
        keep.dropped = len(dups)
        keep.discarded = sum(len(ids) for ids, _ in by_source.values()) - len(first) - len(dups)
        for start in range(0, len(dups), COPY_ROWS):  # compared in blocks: bounded memory
            block = dups[start:start + COPY_ROWS]
            rows = self._rows({(src, row) for _, src, row in block} | {first[i] for i, _, _ in block})
            for i, src, row in block:
                keep_src, keep_row = first[i]
                if not np.array_equal(rows[keep_src, keep_row], rows[src, row], equal_nan=True):
                    raise FeatstackError(
                        f"{self.final}: id {i!r} is stored twice with different features ({keep_src.name}, "
                        f"{src.name}); delete {self.final} and {self.shards}, then rebuild with: "
                        f"{rebuild_command(self.final)}")
        return keep

    @staticmethod
    def _rows(wanted: set[tuple[Path, int]]) -> dict[tuple[Path, int], np.ndarray]:
        """Feature rows by (file, row), each file opened once."""
        out = {}
        for src in {src for src, _ in wanted}:
            rows = sorted(row for s, row in wanted if s == src)
            with h5py.File(src, "r") as f:
                out.update({(src, row): vec for row, vec in zip(rows, f["features"][rows])})
        return out

    def add(self, ids: list[str], features: np.ndarray) -> None:
        self._ids.extend(ids)
        self._blocks.append(features)
        if len(self._ids) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self._ids:
            return
        make_dir(self.shards)
        width = self._blocks[0].shape[1]
        # The rename is the shard's completion marker: a run killed mid-write leaves only a stray .tmp.
        _write_h5(self.shards / f"{time.time_ns():020d}.h5", self._ids, self._blocks, width, {},
                  content=[self.content.get(i, "") for i in self._ids])
        self.written += len(self._ids)
        self._ids, self._blocks = [], []

    def merge(self) -> int:
        """Fold the merged file and every shard into a new merged file; returns its row count.

        Idempotent whatever instant it is killed at: the new file names the shards it absorbed, so a rerun
        deletes them instead of adding them again, and an id is kept once (identical copies are dropped, rows of a
        photo's earlier bytes and non-finite rows too).
        """
        self.flush()
        shards = self._shard_files()
        by_source = self._rows_by_source()
        keep = self._keep_masks(by_source)
        masks = keep.masks
        legacy = self.final.exists() and (ATTRS_SHA256 not in read_attrs(self.final) or not self._has_content())
        if not shards and not keep.dropped and not keep.discarded and not keep.unstamped and not legacy:
            return sum(len(ids) for ids, _ in by_source.values())
        if keep.dropped:
            print(f"warning: {self.final}: dropped {keep.dropped} duplicate rows (identical copies of stored ids, "
                  "left by an interrupted merge)", file=sys.stderr)
        kept = [(i, self.content.get(i) or c) for src, (src_ids, content) in by_source.items()
                for i, c, k in zip(src_ids, content, masks[src]) if k]
        with h5py.File(next(iter(by_source)), "r") as f:
            width = f["features"].shape[1]

        def blocks():
            for src in by_source:
                with h5py.File(src, "r") as f:
                    ds = f["features"]
                    for start in range(0, len(ds), COPY_ROWS):
                        block = ds[start:start + COPY_ROWS]
                        yield block[masks[src][start:start + COPY_ROWS]]

        attrs = dict(self.attrs) or (read_attrs(self.final) if self.final.exists() else {})
        if self.final.exists():
            attrs["created"] = read_attrs(self.final).get("created", attrs.get("created"))
        _write_h5(self.final, [i for i, _ in kept], blocks(), width, attrs, merged_shards=[s.name for s in shards],
                  content=[c for _, c in kept])
        self._finite.clear()  # of the files just replaced or deleted
        self._drop_shards(shards)
        return len(kept)

    def _has_content(self) -> bool:
        with h5py.File(self.final, "r") as f:
            return CONTENT in f

    def _drop_shards(self, shards: list[Path]) -> None:
        """Delete shards the merged file holds (a kill here is safe: the file names them)."""
        for shard in shards:
            shard.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.shards.rmdir()
        with contextlib.suppress(OSError):
            self.shards.parent.rmdir()


@dataclass
class _Keep:
    """What a merge keeps of an entry's files: a row mask per file, and what it leaves out and why."""

    masks: dict = field(default_factory=dict)
    stale: set = field(default_factory=set)  # ids with rows of other bytes than the photo's now
    nonfinite: set = field(default_factory=set)  # ids with rows of inf or NaN
    dropped: int = 0  # identical duplicate rows
    discarded: int = 0  # rows of other bytes, or non-finite
    unstamped: int = 0  # kept rows of unknown bytes that the merge records as the photo's bytes now


def make_dir(folder: Path) -> None:
    """mkdir -p, with a full disk said in one line naming the folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(folder.parent, folder.name) from None
        raise


@contextlib.contextmanager
def writer_lock(paths: DatasetPaths):
    """One writer per dataset store: a second run fails at once instead of interleaving shards."""
    make_dir(paths.root)
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


STAT_COLUMNS = ["path", "size", "mtime_ns", "sha256"]


SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def photo_content(paths: DatasetPaths, table, threads: int = 1) -> tuple[dict[str, str], set[str]]:
    """The sha256 of each photo's bytes, by id, and the ids whose bytes changed since the last run recorded them.

    Hashing every photo on every run would read the whole dataset; a photo whose size and modification time are
    the ones recorded in ``photo_stats.csv`` keeps its recorded sha256, the others are hashed (a touched but
    unchanged photo hashes to the same value, so it is not extracted again). Photos that cannot be read are left
    out: decoding reports them. The record is rewritten for the table's photos; a damaged one is hashed afresh.
    """
    from .split import write_atomic  # split.py imports this module
    try:
        known = pd.read_csv(paths.photo_stats_csv, dtype={"path": str, "size": "int64", "mtime_ns": "int64",
                                                          "sha256": str}, keep_default_na=False)
        # A row whose sha256 is not 64 hex digits (a hand edit, a damaged record) is not trusted: that photo is
        # hashed afresh, or a made-up value would be stored as its content and the photo counted as changed.
        known = {p: (size, mtime, sha) for p, size, mtime, sha in zip(*(known[c].tolist() for c in STAT_COLUMNS))
                 if SHA256_HEX.fullmatch(sha)}
    except (OSError, ValueError, KeyError):
        known = {}
    ids = table["id"].astype(str).tolist()
    files = table["path"].astype(str).tolist()

    def stat(file: str):
        try:
            st = os.stat(file)
        except OSError:
            return None
        # Only a regular file is hashed: opening a named pipe blocks until a writer comes, a device reads for ever
        return (st.st_size, st.st_mtime_ns) if stat_module.S_ISREG(st.st_mode) else None

    def digest(file: str) -> str | None:
        try:
            with open(file, "rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest()
        except OSError:
            return None

    stats = [stat(f) for f in files]
    todo = [k for k, (f, s) in enumerate(zip(files, stats)) if s and known.get(f, (None, None, ""))[:2] != s]
    if len(todo) >= 2000:
        print(f"hashing {len(todo)} new or modified photos (sha256) ...", flush=True)
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="hash") as pool:  # hashlib releases the GIL
        hashes = dict(zip(todo, pool.map(digest, [files[k] for k in todo])))
    content, changed, rows = {}, set(), []
    for k, (i, f, s) in enumerate(zip(ids, files, stats)):
        h = hashes.get(k, known.get(f, ("", "", ""))[2] if s else None)
        if not s or not h:
            continue
        content[i] = h
        if k in hashes and f in known and known[f][2] != h:
            changed.add(i)
        rows.append((f, *s, h))
    if hashes or len(rows) != len(known):  # a rerun that found nothing new rewrites nothing
        write_atomic(paths.photo_stats_csv,
                     lambda p: pd.DataFrame(rows, columns=STAT_COLUMNS).to_csv(p, index=False))
    return content, changed


def stack_names(backbone_of: dict[Path, str]) -> dict[Path, str]:
    """The name stack.py's ``--backbones`` takes for each feature file of a store: its backbone's name, or its file
    stem where the store holds that backbone in more than one configuration."""
    counts: dict[str, int] = {}
    for b in backbone_of.values():
        counts[b] = counts.get(b, 0) + 1
    return {p: b if counts[b] == 1 else Path(p).stem for p, b in backbone_of.items()}
