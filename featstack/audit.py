"""Audit stage: label issues, near duplicates, leakage, outliers and dataset facts of a run, from its cached data."""
from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import shutil
import sys
import time
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import reports
from .errors import FeatstackError
from .features import FeatureSet, load_features, read_bad_ids
from .heartbeat import heartbeat
from .leftovers import dead_leftovers, drop_lease, lease, release, remove_leftover
from .paths import MODELS_DIR, AuditPaths, DatasetPaths, RunPaths
from .store import is_disk_full

# Cosine similarity of centred, L2-normalised features above which two images count as near duplicates. Measured on
# the real dogs-vs-cats photos (README, "Auditing the data"): re-encoded copies (0.5-0.9x size, JPEG quality 41-60)
# scored >= 0.987, the closest pair of distinct photos <= 0.774 (resnet50 + vgg16); 0.95 sits between the two.
SIMILARITY = 0.95
# Feature similarity only ranks candidates: a pair is a duplicate when its pixels agree too. The RMS difference of
# 16x16 greyscale thumbnails over their mean contrast (RMS of the pixel standard deviations), measured (README,
# "Auditing the data"): re-encoded copies of real photos (0.52-0.90x size, JPEG quality 41-60) <= 0.047; the closest
# pair of distinct demo digits 0.089, of distinct real photos 0.645. A perceptual hash (64-bit DCT) cannot tell the
# digits apart: distinct digits differ in as few as 2 bits, copies in up to 2.
PIXEL_SIDE = 16
PIXEL_DIFFERENCE = 0.065
CANDIDATES = 10  # nearest neighbours per image looked at for duplicates, and cleanlab's k for outliers
PCA_DIMS = 256  # neighbour search runs in this many PCA dims; candidate pairs are then scored in the full space
TOP = 20
SPLIT_ORDER = {"train": 0, "holdout": 1, "test": 2}
LABEL_COLUMNS = ["id", "split", "path", "given_label", "suggested_label", "label_quality"]
DUPLICATE_COLUMNS = ["id_a", "id_b", "split_a", "split_b", "similarity", "pixel_difference", "exact", "path_a",
                     "path_b"]
OUTLIER_COLUMNS = ["id", "split", "label", "path", "ood_score"]


@dataclass
class Audit:
    """Everything one audit found; ``write`` turns it into the audit folder."""

    run: RunPaths
    fs: FeatureSet
    paths: dict[str, str]
    label_issues: pd.DataFrame
    duplicates: pd.DataFrame
    outliers: pd.DataFrame
    sizes: pd.DataFrame  # id, width, height (header read); unreadable headers have NaN
    bad_images: int
    notes: list[str]  # what could not be checked, and why
    threshold: float
    clock: Stopwatch
    config: dict  # the run's config.json, for the commands audit.md suggests
    stack_command: tuple[str, ...] = ("python", "stack.py")  # how the user runs stack.py: audit.md's commands


class Stopwatch:
    """Wall and CPU seconds (all threads) of named stages: ``with clock("name", "what it does"): ...``; the stage
    says what it does before it starts, and that it still does every few seconds (featstack.heartbeat)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, doing: str | None = None):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            with heartbeat(doing) if doing else nullcontext():
                yield
        finally:
            self.wall[name] = time.perf_counter() - wall
            self.cpu[name] = time.process_time() - cpu


def _run_folder(run: str | Path | None, models_dir: str | Path) -> RunPaths:
    from .stack import newest_run
    root = Path(run) if run else newest_run(models_dir)
    paths = RunPaths(root)
    if not paths.config_json.is_file():
        raise FeatstackError(f"--run {root}: not a stack.py run folder (no config.json); pass models/<run-id>")
    for needed in (paths.oof_csv, paths.holdout_csv):
        if not needed.is_file():
            raise FeatstackError(f"{needed} is missing; rerun stack.py to rebuild run {paths.run_id}")
    return paths


def _load_run_features(run: RunPaths) -> tuple[dict, FeatureSet]:
    from .stack import RUN_CONFIG_KEYS, read_run_json
    config = read_run_json(run.config_json, {**RUN_CONFIG_KEYS, "features_dir": str})
    features_dir = Path(config["features_dir"])
    if not features_dir.is_dir():
        raise FeatstackError(f"{run.config_json}: its feature store {features_dir} no longer exists; restore it or "
                             "rerun extract_features.py and stack.py")
    stems = [Path(e["file"]).stem for e in config["feature_files"].values()]
    return config, load_features(features_dir, stems, config.get("allow_missing", False))


def image_paths(fs: FeatureSet) -> tuple[dict[str, str], str | None]:
    """id -> image path from the dataset's canonical table; without the data folder, no paths and a note why."""
    from .layouts import read_layout
    data, layout = fs.meta.get("data"), fs.meta.get("layout", "auto")
    try:
        table, _ = read_layout(data, layout)
    except FeatstackError as exc:
        return {}, (f"the images of {data} cannot be listed ({exc}); file hashes, image sizes and contact sheets "
                    "are left out")
    return dict(zip(table["id"], table["path"])), None


def _predictions(csv: Path, classes: list[str]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    # The shared reader refuses NaN, infinite, negative or non-normalised rows: cleanlab would quietly rank them.
    frame = reports.read_predictions(csv, classes, labelled=True)
    index = {c: k for k, c in enumerate(classes)}
    proba = frame[classes].to_numpy(np.float64)
    return frame, np.array([index[l] for l in frame["label"]], dtype=int), proba / proba.sum(axis=1, keepdims=True)


def find_label_issues(frame: pd.DataFrame, labels: np.ndarray, proba: np.ndarray, classes: list[str], split: str,
                      paths: dict[str, str]) -> pd.DataFrame:
    """cleanlab's label issues (its default prune_by_noise_rate filter), worst label-quality score first."""
    from cleanlab.filter import find_label_issues as cleanlab_issues
    from cleanlab.rank import get_label_quality_scores

    if len(set(labels.tolist())) < 2:  # cleanlab needs two classes among the given labels
        return pd.DataFrame(columns=LABEL_COLUMNS)
    quality = get_label_quality_scores(labels, proba)
    with warnings.catch_warnings():
        # "May not flag all label issues in class k, it has too few examples": advice for small classes, not news.
        warnings.filterwarnings("ignore", message="May not flag all label issues", category=UserWarning)
        ranked = cleanlab_issues(labels, proba, return_indices_ranked_by="self_confidence", n_jobs=1)
    ids = frame["id"].to_numpy(object)[ranked]
    return pd.DataFrame({"id": ids, "split": split, "path": [paths.get(i, "") for i in ids],
                         "given_label": [classes[k] for k in labels[ranked]],
                         "suggested_label": [classes[k] for k in proba[ranked].argmax(axis=1)],
                         "label_quality": quality[ranked]}, columns=LABEL_COLUMNS)


def embedding(fs: FeatureSet) -> np.ndarray:
    """Rows as unit vectors: each backbone block L2-normalised (equal weight), centred, then normalised again.

    Centring matters: pooled ReLU features share a large positive mean, so raw cosine similarity of two unrelated
    photos is 0.99 and a re-encoded copy is hard to tell apart from them (measured: README, "Auditing the data").
    """
    n = len(fs.ids)
    out = np.empty((n, sum(b.shape[1] for b in fs.blocks.values())), np.float32)
    start = 0
    for block in fs.blocks.values():
        width = block.shape[1]
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        np.divide(block, np.maximum(norms, 1e-12), out=out[:, start:start + width])
        start += width
    out -= out.mean(axis=0)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def reduce(unit: np.ndarray, dims: int = PCA_DIMS, seed: int = 0, fit_rows: int = 4096) -> np.ndarray:
    """PCA to at most ``dims`` dims, rows L2-normalised: the space the neighbour searches run in.

    The PCA is fitted on ``fit_rows`` random rows and applied to all: the leading directions of 20k CNN feature
    vectors are those of 4k of them, at a fifth of the cost.
    """
    from sklearn.decomposition import PCA
    n, d = unit.shape
    if d > dims and n > dims:
        rows = np.sort(np.random.default_rng(seed).choice(n, min(n, fit_rows), replace=False))
        pca = PCA(n_components=min(dims, len(rows) - 1), svd_solver="randomized", iterated_power=2,
                  random_state=seed).fit(unit[rows])
        unit = pca.transform(unit)
    return (unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class Neighbours:
    """Every row's k nearest other rows by cosine, found once by float32 matrix products in row blocks."""

    def __init__(self, rows: np.ndarray, k: int = CANDIDATES, block: int = 2048):
        n = len(rows)
        self.k = k = min(k, n - 1)
        self.indices = np.empty((n, k), np.int64)
        self.distances = np.empty((n, k), np.float32)
        for start in range(0, n, block):
            sim = rows[start:start + block] @ rows.T
            sim[np.arange(len(sim)), np.arange(start, start + len(sim))] = -np.inf  # never its own neighbour
            part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            part_sim = np.take_along_axis(sim, part, axis=1)
            order = np.argsort(-part_sim, axis=1)
            self.indices[start:start + block] = np.take_along_axis(part, order, axis=1)
            self.distances[start:start + block] = 1 - np.take_along_axis(part_sim, order, axis=1)
        np.maximum(self.distances, 0, out=self.distances)

    def as_sklearn(self, rows: np.ndarray):
        """A fitted scikit-learn NearestNeighbors answering with these lists, as cleanlab's ``knn`` parameter."""
        from sklearn.neighbors import NearestNeighbors
        graph = self

        class Precomputed(NearestNeighbors):
            # cleanlab's OutOfDistribution takes any NearestNeighbors subclass; this one answers a query of the
            # fitted rows with the lists above, each row's own entry left out.
            def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
                if X is None or X is rows:
                    return (graph.distances, graph.indices) if return_distance else graph.indices
                return super().kneighbors(X, n_neighbors, return_distance)

        return Precomputed(n_neighbors=self.k, metric="cosine", algorithm="brute").fit(rows)


def file_hash_groups(ids: np.ndarray, paths: dict[str, str]) -> list[list[str]]:
    """Groups of ids whose files are byte-identical; only files sharing a size with another file are hashed."""
    by_size: dict[int, list[str]] = defaultdict(list)
    for i in ids:
        path = paths.get(i)
        if path:
            try:
                by_size[os.stat(path).st_size].append(i)
            except OSError:
                pass
    candidates = [i for group in by_size.values() if len(group) > 1 for i in group]

    def digest(i):
        try:
            with open(paths[i], "rb") as f:
                return hashlib.file_digest(f, "sha1").hexdigest()
        except OSError:
            return None

    by_hash: dict[str, list[str]] = defaultdict(list)
    with ThreadPoolExecutor(max_workers=4) as pool:
        for i, h in zip(candidates, pool.map(digest, candidates)):
            if h:
                by_hash[h].append(i)
    return [group for group in by_hash.values() if len(group) > 1]


def pixel_signature(path: str) -> np.ndarray | None:
    """The image as the extractor decodes it, greyscale, area-averaged to PIXEL_SIDE square; None if unreadable."""
    from PIL import Image

    from .decode import BadImage, decode_rgb
    try:
        img = decode_rgb(path)
    except BadImage:
        return None
    return np.asarray(img.convert("L").resize((PIXEL_SIDE, PIXEL_SIDE), Image.BOX), np.float32)


def pixel_difference(a: np.ndarray, b: np.ndarray) -> float:
    """RMS difference of two signatures over their mean contrast: 0 for the same picture, whatever its contrast."""
    contrast = np.sqrt((a.var() + b.var()) / 2)
    return float(np.sqrt(np.mean((a - b) ** 2)) / max(contrast, 1.0))


def find_duplicates(fs: FeatureSet, unit: np.ndarray, neighbours: Neighbours | None, paths: dict[str, str],
                    threshold: float = SIMILARITY, notes: list[str] | None = None) -> pd.DataFrame:
    """Duplicate pairs across and within splits: byte-identical files, and pairs whose features are similar
    (cosine >= threshold) and whose pixels then confirm it (pixel_difference <= PIXEL_DIFFERENCE).

    Candidates whose images cannot be read are not reported; ``notes`` says how many there were.
    """
    n = len(fs.ids)
    pairs: set[tuple[int, int]] = set()
    if neighbours is not None:
        rows = np.repeat(np.arange(n), neighbours.k)
        cols = neighbours.indices.ravel()
        pairs = set(zip(np.minimum(rows, cols).tolist(), np.maximum(rows, cols).tolist()))
    row_of = {i: k for k, i in enumerate(fs.ids)}
    exact = set()
    for group in file_hash_groups(fs.ids, paths):
        members = sorted(row_of[i] for i in group)
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                exact.add((members[x], members[y]))
    pairs |= exact
    if not pairs:
        return pd.DataFrame(columns=DUPLICATE_COLUMNS)
    a, b = np.array(sorted(pairs)).T
    # Exact cosine in the full space, not the PCA estimate; in chunks, as all pairs' rows would need gigabytes.
    similarity = np.concatenate([np.einsum("ij,ij->i", unit[a[i:i + 4096]], unit[b[i:i + 4096]])
                                 for i in range(0, len(a), 4096)])
    is_exact = np.array([p in exact for p in zip(a.tolist(), b.tolist())])
    keep = (similarity >= threshold) | is_exact
    a, b, similarity, is_exact = a[keep], b[keep], similarity[keep], is_exact[keep]
    difference = _pixel_differences(fs.ids, a, b, is_exact, paths)
    unchecked = int(np.isnan(difference).sum())
    if unchecked and notes is not None:
        notes.append(f"{unchecked} pair{'s' if unchecked > 1 else ''} with similar features could not be checked by "
                     "their pixels (image files missing or unreadable) and are not reported as duplicates")
    keep = is_exact | (difference <= PIXEL_DIFFERENCE)
    rejected = int((difference > PIXEL_DIFFERENCE).sum())
    a, b, similarity, difference, is_exact = a[keep], b[keep], similarity[keep], difference[keep], is_exact[keep]
    # The earlier split first (train, holdout, test), so a leak reads train -> test.
    swap = np.array([SPLIT_ORDER.get(fs.split[x], 3) > SPLIT_ORDER.get(fs.split[y], 3) for x, y in zip(a, b)], bool)
    a, b = np.where(swap, b, a), np.where(swap, a, b)
    frame = pd.DataFrame({"id_a": fs.ids[a], "id_b": fs.ids[b], "split_a": fs.split[a], "split_b": fs.split[b],
                          "similarity": np.round(similarity.astype(float), 6),
                          "pixel_difference": np.round(difference, 4), "exact": is_exact,
                          "path_a": [paths.get(i, "") for i in fs.ids[a]],
                          "path_b": [paths.get(i, "") for i in fs.ids[b]]}, columns=DUPLICATE_COLUMNS)
    frame = frame.sort_values(["exact", "similarity"], ascending=False, kind="stable").reset_index(drop=True)
    frame.attrs["pixel_rejected"] = rejected  # candidates whose features were similar but whose pixels differ
    return frame


def _pixel_differences(ids: np.ndarray, a: np.ndarray, b: np.ndarray, is_exact: np.ndarray,
                       paths: dict[str, str]) -> np.ndarray:
    """pixel_difference of each candidate pair (0 for byte-identical files, NaN where an image cannot be read);
    each image is decoded once, only the candidates' images."""
    need = sorted({int(r) for r in np.concatenate([a[~is_exact], b[~is_exact]])})
    listed = [r for r in need if paths.get(ids[r])]
    with ThreadPoolExecutor(max_workers=4) as pool:
        signature = dict(zip(listed, pool.map(lambda r: pixel_signature(paths[ids[r]]), listed)))
    out = np.zeros(len(a))
    for k, (x, y) in enumerate(zip(a.tolist(), b.tolist())):
        if not is_exact[k]:
            sx, sy = signature.get(x), signature.get(y)
            out[k] = np.nan if sx is None or sy is None else pixel_difference(sx, sy)
    return out


def find_outliers(fs: FeatureSet, reduced: np.ndarray, neighbours: Neighbours | None,
                  paths: dict[str, str]) -> pd.DataFrame:
    """cleanlab's out-of-distribution score on the features; flagged with cleanlab Datalab's default rule."""
    from cleanlab.datalab.internal.issue_manager.outlier import OutlierIssueManager
    from cleanlab.outlier import OutOfDistribution

    if neighbours is None or len(fs.ids) <= CANDIDATES + 1:
        return pd.DataFrame(columns=OUTLIER_COLUMNS)
    ood = OutOfDistribution(params={"knn": neighbours.as_sklearn(reduced)})
    scores = ood.score(features=reduced)
    # score = exp(-t * d / median d), so -log(score) is the average neighbour distance up to a scale; Datalab
    # flags a distance above Q3 + (1 / threshold - 1) * IQR, which no rescaling changes.
    distance = -np.log(np.maximum(scores, 1e-300))
    q1, q3 = np.percentile(distance, [25, 75])
    threshold = OutlierIssueManager.DEFAULT_THRESHOLDS["features"]
    flagged = np.flatnonzero(distance > q3 + (1 / threshold - 1) * (q3 - q1))
    flagged = flagged[np.argsort(scores[flagged], kind="stable")]
    return pd.DataFrame({"id": fs.ids[flagged], "split": fs.split[flagged],
                         "label": [l if l is not None else "" for l in fs.labels[flagged]],
                         "path": [paths.get(i, "") for i in fs.ids[flagged]], "ood_score": scores[flagged]},
                        columns=OUTLIER_COLUMNS)


def header_sizes(ids: np.ndarray, paths: dict[str, str]) -> pd.DataFrame:
    """Width and height as stored in each file's header (PIL reads the header only; no pixel is decoded)."""
    from PIL import Image

    def size(i):
        try:
            with Image.open(paths[i]) as img:
                return img.size
        except Exception:  # noqa: BLE001 - any unreadable header is counted, not raised
            return (np.nan, np.nan)

    listed = [i for i in ids if i in paths]
    with ThreadPoolExecutor(max_workers=4) as pool:
        sizes = list(pool.map(size, listed))
    return pd.DataFrame({"id": listed, "width": [s[0] for s in sizes], "height": [s[1] for s in sizes]})


def audit_run(run: str | Path | None = None, *, threshold: float = SIMILARITY,
              models_dir: str | Path = MODELS_DIR) -> Audit:
    """Find label issues, duplicates and outliers of a run; nothing is written."""
    if not 0 < threshold <= 1:
        raise FeatstackError(f"--threshold {threshold}: a cosine similarity above 0 and at most 1")
    if importlib.util.find_spec("cleanlab") is None:
        raise FeatstackError("audit.py needs cleanlab, which is not installed: pip install cleanlab "
                             "(or featstack[audit])")
    clock = Stopwatch()
    with clock("load", "loading the run's features"):
        run_paths = _run_folder(run, models_dir)
        config, fs = _load_run_features(run_paths)
        classes = list(config["classes"])
        paths, data_note = image_paths(fs)
    with clock("label_issues", "finding label issues (cleanlab)"):
        issues, notes = [], [data_note] if data_note else []
        for csv, split in ((run_paths.oof_csv, "train"), (run_paths.holdout_csv, "holdout")):
            frame, labels, proba = _predictions(csv, classes)
            if len(frame) and len(set(labels.tolist())) < 2:
                notes.append(f"the {split} rows hold one class only, and cleanlab needs two: no {split} label issues")
            issues.append(find_label_issues(frame, labels, proba, classes, split, paths))
        label_issues = pd.concat(issues, ignore_index=True)
    with clock("embedding", "centring and reducing the features"):
        unit = embedding(fs)
        reduced = reduce(unit)
    with clock("neighbours", "finding each image's nearest neighbours"):
        neighbours = Neighbours(reduced) if len(fs.ids) > 1 else None
    with clock("duplicates", "confirming near duplicates by their pixels"):
        duplicates = find_duplicates(fs, unit, neighbours, paths, threshold, notes)
        del unit
    with clock("outliers", "scoring outliers"):
        outliers = find_outliers(fs, reduced, neighbours, paths)
    with clock("sizes", "reading image sizes from their headers"):
        sizes = header_sizes(fs.ids, paths) if paths else pd.DataFrame(columns=["id", "width", "height"])
        bad = len(read_bad_ids(DatasetPaths(fs.paths.root)))
    return Audit(run_paths, fs, paths, label_issues, duplicates, outliers, sizes, bad, notes, threshold, clock,
                 config)


def run_audit(run: str | Path | None = None, *, top: int = TOP, threshold: float = SIMILARITY,
              models_dir: str | Path = MODELS_DIR, stack_command: tuple[str, ...] = ("python", "stack.py")) -> Path:
    """Audit a run and write ``<run>/audit/``; prints the counts and, last, the folder."""
    if top < 1:
        raise FeatstackError(f"--top {top}: must be at least 1")
    started = time.perf_counter()
    audit = audit_run(run, threshold=threshold, models_dir=models_dir)
    audit.stack_command = stack_command
    if audit.fs.random_weights:
        print(f"warning: run {audit.run.run_id} was trained on features of RANDOM weights (untrained backbones): "
              "duplicates are confirmed by their pixels, but label issues and outliers say little")
    for note in audit.notes:
        print(f"warning: {note}")
    with audit.clock("write", "writing the audit (audit.md, CSV files, contact sheets)"):
        folder = write_audit(audit, top)
    for finding, count, _ in summary_rows(audit):
        print(f"{finding}: {count}")
    print(f"{time.perf_counter() - started:.1f} s")
    print(folder)
    return folder


def pair_kind(split_a: str, split_b: str) -> str:
    pair = {split_a, split_b}
    if "test" in pair and pair != {"test"}:
        return "leak into test"
    if pair == {"train", "holdout"}:
        return "train ↔ holdout"
    return f"within {split_a}"


def summary_rows(audit: Audit) -> list[tuple[str, str, str]]:
    """(finding, count, file) for the console and audit.md."""
    li, dup = audit.label_issues, audit.duplicates
    kinds = pd.Series([pair_kind(a, b) for a, b in zip(dup["split_a"], dup["split_b"])], dtype=object).value_counts()
    kinds_text = ", ".join(f"{v} {k}" for k, v in kinds.items()) or "none"
    rows = [("label issues", f"{int((li['split'] == 'train').sum())} train (out-of-fold), "
                             f"{int((li['split'] == 'holdout').sum())} holdout", "label_issues.csv"),
            ("duplicates", f"{len(dup)} pairs ({kinds_text}), {int(dup['exact'].sum())} byte-identical"
                           + (f"; {rejected} more with similar features but different pixels left out"
                              if (rejected := dup.attrs.get("pixel_rejected", 0)) else ""), "duplicates.csv"),
            ("outliers", str(len(audit.outliers)), "outliers.csv"),
            ("bad images", str(audit.bad_images), "")]
    if len(audit.sizes):
        rows.append(("unreadable image headers", str(int(audit.sizes["width"].isna().sum())), ""))
    return rows


RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths in one step
LEFTOVER = r"\.audit\.(?P<kind>tmp|old)(?P<pid>\d+)"


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing folders in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the system or the
    file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # a C library older than glibc 2.28
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def remove_leftovers(run: RunPaths) -> None:
    """Remove what killed audits of this run left (``.audit.tmp<pid>``, ``.audit.old<pid>``), never a live one's;
    an old audit set aside by a run killed before it could put the new one in place goes back to ``audit/``."""
    for path in dead_leftovers(run.root, LEFTOVER):
        if path.name.startswith(".audit.old") and not os.path.lexists(run.audit_dir):
            try:
                os.rename(path, run.audit_dir)
                drop_lease(path)
                continue
            except OSError:
                if not os.path.lexists(run.audit_dir):
                    release([path])
                    continue  # the only copy of the old audit: kept where it is
        remove_leftover(path)


def publish(tmp: Path, final: Path, old: Path) -> None:
    """Put the finished folder ``tmp`` at ``final``: at every instant ``final`` is the old audit or the new one.

    With an old audit there, the two folders are swapped in one step and the old one (now at ``tmp``) is deleted
    by the caller. Where the file system cannot swap, the old audit is renamed aside first: a kill between the two
    renames leaves it at ``old``, and the next audit of the run puts it back.
    """
    while True:
        if not os.path.lexists(final):
            try:
                os.rename(tmp, final)
                return
            except OSError as exc:  # another audit of this run published first: swap with its folder
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        if exchange(tmp, final):
            return
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            os.rename(old, final)
            raise
        return


def _fill_audit(audit: Audit, top: int, tmp: AuditPaths, final: AuditPaths, old: Path) -> None:
    shutil.rmtree(tmp.root, ignore_errors=True)
    tmp.root.mkdir()
    try:
        audit.label_issues.to_csv(tmp.label_issues_csv, index=False)
        audit.duplicates.to_csv(tmp.duplicates_csv, index=False)
        audit.outliers.to_csv(tmp.outliers_csv, index=False)
        plot_class_balance(audit.fs, tmp.class_balance_png)
        if len(audit.sizes):
            plot_image_sizes(audit.sizes, tmp.image_sizes_png)
        if audit.paths and len(audit.label_issues):
            label_sheet(audit.label_issues.head(top), tmp.label_issues_png)
        if audit.paths and len(audit.duplicates):
            duplicate_sheet(audit.duplicates.head(top), tmp.duplicates_png)
        tmp.audit_md.write_text(markdown(audit, top, tmp))
        publish(tmp.root, final.root, old)
    finally:
        shutil.rmtree(tmp.root, ignore_errors=True)  # after a swap: the old audit
        shutil.rmtree(old, ignore_errors=True)


def write_audit(audit: Audit, top: int = TOP) -> Path:
    """Write every file into a hidden folder, then swap it with ``<run>/audit`` (see ``publish``)."""
    final = AuditPaths(audit.run.audit_dir)
    tmp = AuditPaths(audit.run.root / f".audit.tmp{os.getpid()}")
    old = audit.run.root / f".audit.old{os.getpid()}"
    # This run's leftovers, and those of killed audits of the other runs beside it.
    for root in sorted({audit.run.root, *(p.parent for p in audit.run.root.parent.glob("*/.audit.*"))}):
        if (root / "config.json").is_file():
            remove_leftovers(RunPaths(root))
    try:
        # Leases, not the pid alone, keep this audit's folders from another container's cleanup (leftovers.py).
        with lease(tmp.root), lease(old):
            _fill_audit(audit, top, tmp, final, old)
    except Exception as exc:  # a full disk may surface wrapped by pandas or matplotlib
        if not is_disk_full(exc):
            raise
        raise FeatstackError(f"{audit.run.root}: no space left on device while writing the audit; the previous "
                             f"audit folder (if any) is kept as it was: free space there and rerun audit.py") from None
    return final.root


def _table(frame: pd.DataFrame, columns: list[str], top: int) -> list[str]:
    if frame.empty:
        return ["None found."]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for rec in frame.head(top).to_dict("records"):
        cells = [f"{rec[c]:.4f}" if isinstance(rec[c], float) else str(rec[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    if len(frame) > top:
        lines.append(f"\n… and {len(frame) - top} more in the CSV file.")
    return lines


def markdown(audit: Audit, top: int, files: AuditPaths) -> str:
    fs, li, dup = audit.fs, audit.label_issues, audit.duplicates
    counts = {s: int((fs.split == s).sum()) for s in SPLIT_ORDER}
    lines = [f"# Data audit of run {audit.run.run_id}", "",
             f"Feature store `{fs.paths.root}` ({counts['train']} train, {counts['holdout']} holdout, "
             f"{counts['test']} test rows; backbones {', '.join(fs.blocks)}), images in `{fs.meta.get('data')}`.", ""]
    if fs.random_weights:
        lines += ["**RANDOM weights**: features of untrained backbones find duplicates but say little about labels "
                  "or outliers.", ""]
    lines += [f"Note: {note}." for note in audit.notes] + ([""] if audit.notes else [])
    lines += ["| finding | count | file |", "|---|---|---|"]
    lines += [f"| {finding} | {count} | {f'`{name}`' if name else ''} |"
              for finding, count, name in summary_rows(audit)]
    lines += ["", "## Label issues", "",
              "cleanlab `find_label_issues` on the run's **out-of-fold** probabilities (training rows; each row was "
              "predicted by a model that never saw it) and on the holdout predictions, ranked by cleanlab's "
              "label-quality score (lowest first).", ""]
    lines += _table(li, ["id", "split", "given_label", "suggested_label", "label_quality"], top)
    if files.label_issues_png.exists():
        lines += ["", "![label issues](label_issues.png)"]
    lines += ["", "## Duplicates and leakage", "",
              f"Byte-identical files (`exact`), and pairs whose features are similar (cosine similarity ≥ "
              f"{audit.threshold} of centred, L2-normalised features) **and** whose pixels agree: the RMS difference "
              f"of {PIXEL_SIDE}×{PIXEL_SIDE} greyscale thumbnails over their contrast (`pixel_difference`) ≤ "
              f"{PIXEL_DIFFERENCE}, where re-encoded copies measured ≤ 0.047 and distinct images ≥ 0.089. A train ↔ "
              "holdout pair makes the holdout score optimistic; a pair that reaches into test inflates it.", ""]
    lines += _table(dup, ["id_a", "id_b", "split_a", "split_b", "similarity", "pixel_difference", "exact"], top)
    if files.duplicates_png.exists():
        lines += ["", "![duplicates](duplicates.png)"]
    lines += ["", "## Outliers", "",
              "cleanlab `OutOfDistribution` score on the features (lowest = least like any other image); flagged "
              "with cleanlab Datalab's default rule.", ""]
    lines += _table(audit.outliers, ["id", "split", "label", "ood_score"], top)
    lines += ["", "## Dataset facts", ""]
    if len(audit.sizes):
        w, h = audit.sizes["width"].dropna(), audit.sizes["height"].dropna()
        if len(w):
            lines += [f"Image sizes from the file headers: width {int(w.min())}–{int(w.max())} (median "
                      f"{int(w.median())}), height {int(h.min())}–{int(h.max())} (median {int(h.median())}).", "",
                      "![image sizes](image_sizes.png)", ""]
    labelled = pd.Series([l for l, s in zip(fs.labels, fs.split) if s in ("train", "holdout")], dtype=object)
    if len(labelled):
        counts_per = labelled.value_counts()
        lines += [f"Class balance (train + holdout): {len(counts_per)} classes, {int(counts_per.min())} to "
                  f"{int(counts_per.max())} images per class.", "", "![class balance](class_balance.png)", ""]
    lines += [f"Bad images (could not be decoded at extraction, `bad_images.csv`): {audit.bad_images}.", "",
              "## Acting on it", "",
              "Look at the contact sheets and the photos named in the CSV files. To retrain without the training "
              "rows you judge wrong, edit `label_issues.csv` down to the rows you confirm (any CSV with an `id` "
              "column will do) and run, from the folder this audit ran in:", "",
              "```bash", retrain_command(audit), "```", "",
              "It trains the run's model on the same features without those rows. Holdout rows are never excluded, "
              "so holdout scores stay comparable across runs.", ""]
    return "\n".join(lines)


def shown_path(path: str | Path) -> str:
    """A path as the user would type it where they are: relative below the current folder, else absolute."""
    full = Path(path).resolve()
    try:
        return str(full.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(full)


def retrain_command(audit: Audit) -> str:
    """The run's own stack.py command with --exclude the audit's label_issues.csv, every path real and quoted."""
    import shlex
    c = audit.config
    args = [*audit.stack_command, "--features", shown_path(c["features_dir"]),
            "--backbones", ",".join(c["backbones"]), "--model", str(c["model"])]
    if c.get("model") == "stack" and c.get("level2"):
        args += ["--level2", str(c["level2"])]
    args += ["--C", str(c.get("C", "1.0")), "--folds", str(c.get("folds", 5)), "--seed", str(c.get("seed", 0))]
    if c.get("allow_missing"):
        args.append("--allow-missing")
    args += ["--models-dir", shown_path(audit.run.root.parent),
             "--exclude", shown_path(AuditPaths(audit.run.audit_dir).label_issues_csv)]
    return shlex.join(args)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _short(text: str, width: int = 24) -> str:
    text = str(text)
    return text if len(text) <= width else text[:width - 1] + "…"


def thumbnail(path: str, side: int = 256) -> np.ndarray:
    """The photo as the extractor decodes it (EXIF-rotated RGB), shrunk to fit ``side``; grey if unreadable."""
    from PIL import Image

    from .decode import BadImage, decode_rgb
    try:
        img = decode_rgb(path)
    except BadImage:
        return np.full((side, side, 3), 128, np.uint8)
    img.thumbnail((side, side), Image.BILINEAR)
    return np.asarray(img)


def _sheet(groups: list[tuple[str, list[tuple[str, str]]]], png: Path, per_row: int, title: str) -> None:
    """A contact sheet: each group (a caption and its (path, caption) photos) in its own framed panel."""
    plt = _pyplot()
    size = len(groups[0][1])
    rows = -(-len(groups) // per_row)
    fig = plt.figure(figsize=(2.7 * size * per_row, 3.4 * rows + 0.6), layout="constrained")
    fig.suptitle(title, fontsize=13)
    panels = np.atleast_1d(fig.subfigures(rows, per_row, wspace=0.03, hspace=0.03)).ravel()
    for k, panel in enumerate(panels):
        if k >= len(groups):
            continue
        caption, photos = groups[k]
        panel.set_facecolor("#eef2f7" if (k // per_row + k % per_row) % 2 == 0 else "#f7f4ee")
        panel.suptitle(caption, fontsize=10, ha="left", x=0.03)
        axes = np.atleast_1d(panel.subplots(1, len(photos)))
        for ax, (path, label) in zip(axes, photos):
            ax.imshow(thumbnail(path))
            ax.axis("off")
            if label:
                ax.set_title(label, fontsize=9)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def label_sheet(issues: pd.DataFrame, png: Path) -> None:
    groups = [(f"{_short(r['id'])}\n{r['split']}, given: {_short(r['given_label'], 19)}\n"
               f"suggested: {_short(r['suggested_label'], 22)}\nlabel quality {r['label_quality']:.3f}",
               [(r["path"], "")]) for r in issues.to_dict("records") if r["path"]]
    if groups:
        _sheet(groups, png, 5, "Label issues, worst first: given label vs the out-of-fold model's suggestion")


def duplicate_sheet(pairs: pd.DataFrame, png: Path) -> None:
    groups = []
    for k, r in enumerate(pairs.to_dict("records"), 1):
        if r["path_a"] and r["path_b"]:
            how = ("byte-identical" if r["exact"] else
                   f"similarity {r['similarity']:.3f}, pixel difference {r['pixel_difference']:.3f}")
            groups.append((f"#{k}  {pair_kind(r['split_a'], r['split_b'])}\n{how}",
                           [(r["path_a"], f"{r['split_a']}: {_short(r['id_a'], 20)}"),
                            (r["path_b"], f"{r['split_b']}: {_short(r['id_b'], 20)}")]))
    if groups:
        _sheet(groups, png, 2, "Duplicate pairs, most similar first")


def plot_image_sizes(sizes: pd.DataFrame, png: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, column in zip(axes, ("width", "height")):
        values = sizes[column].dropna()
        ax.hist(values, bins=40, color="#4878a8")
        ax.set_xlabel(f"{column} (px, from the file header)")
        ax.set_ylabel("images")
    unreadable = int(sizes["width"].isna().sum())
    fig.suptitle(f"Image sizes of {len(sizes) - unreadable} images" + (f" ({unreadable} unreadable headers)"
                                                                        if unreadable else ""))
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def plot_class_balance(fs: FeatureSet, png: Path) -> None:
    plt = _pyplot()
    frame = pd.DataFrame({"label": fs.labels, "split": fs.split})
    frame = frame[frame["split"].isin(["train", "holdout"])]
    counts = frame.groupby(["label", "split"]).size().unstack(fill_value=0).reindex(columns=["train", "holdout"],
                                                                                    fill_value=0)
    counts = counts.reindex([c for c in fs.classes if c in counts.index])  # the dataset's class order
    n = len(counts)
    # Constrained layout keeps the title and the legend (outside the axes, over no bar) inside the figure.
    fig, ax = plt.subplots(figsize=(max(7.0, 0.14 * n + 3), 4.5), layout="constrained")
    ax.bar(range(n), counts["train"], label="train", color="#4878a8")
    ax.bar(range(n), counts["holdout"], bottom=counts["train"], label="holdout", color="#e0a040")
    ax.set_xticks(range(n), counts.index, rotation=90, fontsize=max(4.0, min(10.0, 400 / max(n, 1))))
    ax.set_ylabel("images")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(f"Class balance: {n} classes, {int((fs.split == 'test').sum())} unlabelled test images")
    fig.savefig(png, dpi=90)
    plt.close(fig)
