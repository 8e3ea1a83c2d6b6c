"""The project's one exact cosine neighbour search: unit float32 rows, top-k by matrix products in query blocks.

Everything that looks for the nearest photos (the knn retrieval head, the audit's near duplicates) goes through
``top_k`` / ``top_k_groups``. Memory: a block of queries against the whole gallery is the only large temporary, and
its row count is chosen so that it stays under ``MEMORY`` bytes, so the peak grows with the gallery (the gallery
itself and one row of temporaries per query of the block) and not with the number of queries.

Ties are broken deterministically: equal similarities rank the lower gallery index (or group index) first, whatever
the block size or BLAS, so two runs, and the audit and the app, list the same neighbours in the same order.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_array, check_is_fitted

# Bytes of temporaries per query block: the float32 similarity block plus argpartition's int64 indices and a mask,
# 16 bytes per (query, gallery) pair. 128 MiB keeps a 100k gallery at 83 queries per block; with it the 100k x 2048
# search ran at 1.3-1.6x scikit-learn's brute force (BENCHMARKS.md, benchmarks/bench_knn.py).
MEMORY = 128 * 2 ** 20
BYTES_PER_PAIR = 16
MAX_BLOCK = 4096


def unit_rows(x, copy: bool = True) -> np.ndarray:
    """Rows as float32 unit vectors (a zero row stays zero: similarity 0 to everything)."""
    x = check_array(x, dtype=np.float32, copy=copy)
    # einsum sums the squares row by row without a gallery-sized temporary (np.linalg.norm squares a full copy).
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    x /= np.maximum(norms, 1e-12)[:, None]
    return x


class CosineSpace(TransformerMixin, BaseEstimator):
    """The space neighbours are searched in: L2-normalised rows, optionally PCA-whitened and normalised again.

    The whitening (and its centring) is fitted on the rows given to ``fit`` only, the gallery / training rows, so
    queries never shape the space they are compared in. Whitening matters for pooled CNN features: they share a
    large positive mean, so raw cosine similarity of unrelated photos is close to 1, and a few dominant directions
    drown the identity-specific ones.
    """

    def __init__(self, whiten: bool = False, n_components: int | float | None = None, random_state: int = 0):
        self.whiten = whiten
        self.n_components = n_components
        self.random_state = random_state

    def fit(self, X, y=None):
        unit = unit_rows(X)
        self.n_features_in_ = unit.shape[1]
        if self.whiten:
            from sklearn.decomposition import PCA
            n_components = self.n_components
            if n_components is None:
                n_components = min(unit.shape[0] - 1, unit.shape[1])
            elif isinstance(n_components, int):
                n_components = min(n_components, unit.shape[0] - 1, unit.shape[1])
            # The trailing components of few rows have near-zero variance; whitening them would amplify noise,
            # so they are cut where the variance falls under 1e-6 of the first one.
            pca = PCA(n_components=n_components, whiten=True, random_state=self.random_state).fit(unit)
            keep = max(1, int((pca.explained_variance_ > 1e-6 * pca.explained_variance_[0]).sum()))
            self.mean_ = pca.mean_.astype(np.float32)
            self.projection_ = (pca.components_[:keep].T / np.sqrt(pca.explained_variance_[:keep])).astype(np.float32)
        else:
            self.mean_ = self.projection_ = None
        return self

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self, "n_features_in_")
        unit = unit_rows(X)
        if unit.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {unit.shape[1]} features, but the space was fitted on {self.n_features_in_}")
        if self.projection_ is None:
            return unit
        return unit_rows((unit - self.mean_) @ self.projection_, copy=False)


def block_rows(n_gallery: int, memory: int = MEMORY) -> int:
    """Queries per block so that a block's temporaries stay under ``memory`` bytes."""
    return int(np.clip(memory // max(1, n_gallery * BYTES_PER_PAIR), 1, MAX_BLOCK))


def similarity_blocks(queries: np.ndarray, gallery: np.ndarray, memory: int = MEMORY
                      ) -> Iterator[tuple[int, np.ndarray]]:
    """(first query row, similarities of a block of queries to every gallery row), for unit float32 rows."""
    step = block_rows(len(gallery), memory)
    for start in range(0, len(queries), step):
        yield start, queries[start:start + step] @ gallery.T


def select_top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k highest scores of each row and their columns, highest first, equal scores by the lower column.

    ``scores`` may be overwritten (it is a temporary block). argpartition alone would pick among equal scores at the
    k-th place arbitrarily; rows where such a tie straddles the cut are selected again by a full stable order.
    """
    m, n = scores.shape
    k = min(k, n)
    if k == 0:
        return np.empty((m, 0), np.int64), np.empty((m, 0), scores.dtype)
    if k < n:
        cols = np.argpartition(scores, n - k, axis=1)[:, n - k:]
    else:
        cols = np.broadcast_to(np.arange(n), (m, n)).copy()
    top = np.take_along_axis(scores, cols, axis=1)
    if k < n:
        kth = top.min(axis=1, keepdims=True)
        straddle = np.flatnonzero((scores >= kth).sum(axis=1) > k)
        for r in straddle:
            cols[r] = np.lexsort((np.arange(n), -scores[r]))[:k]
            top[r] = scores[r, cols[r]]
    order = np.lexsort((cols, -top), axis=1)
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(top, order, axis=1)


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int, exclude: np.ndarray | None = None,
          memory: int = MEMORY) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k: (gallery indices, similarities), each (n_queries, min(k, n_gallery)), best first.

    ``queries`` and ``gallery`` are unit float32 rows (``unit_rows`` / ``CosineSpace.transform``). ``exclude[i]``,
    when given, is a gallery row query i may not return (its own row when the gallery is the queries; -1 for none).
    """
    n = len(gallery)
    k = min(k, n - (exclude is not None and n > 0 and bool((np.asarray(exclude) >= 0).any())))
    indices = np.empty((len(queries), max(k, 0)), np.int64)
    similarities = np.empty((len(queries), max(k, 0)), np.float32)
    for start, sim in similarity_blocks(queries, gallery, memory):
        if exclude is not None:
            own = np.asarray(exclude[start:start + len(sim)])
            rows = np.flatnonzero(own >= 0)
            sim[rows, own[rows]] = -np.inf
        indices[start:start + len(sim)], similarities[start:start + len(sim)] = select_top(sim, k)
    return indices, similarities


def group_starts(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gallery order that sorts rows by group, first position of each group in that order) for ``group_max``."""
    order = np.argsort(groups, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(groups[order]) != 0])
    return order, starts


def group_max_blocks(queries: np.ndarray, gallery: np.ndarray, groups: np.ndarray, memory: int = MEMORY
                     ) -> Iterator[tuple[int, np.ndarray]]:
    """(first query row, each query's highest similarity to each group's rows), groups in ascending group code.

    ``groups`` are integer codes 0..G-1 of the gallery rows, every code present: an identity's answer is its
    closest photo.
    """
    groups = np.asarray(groups)
    order, starts = group_starts(groups)
    # A gallery already stored by group (KNNRetrieval keeps it so) is used as is: no second copy of it.
    ordered = gallery if (np.diff(groups) >= 0).all() else np.ascontiguousarray(gallery[order])
    for start, sim in similarity_blocks(queries, ordered, memory):
        yield start, np.maximum.reduceat(sim, starts, axis=1)


def top_k_groups(queries: np.ndarray, gallery: np.ndarray, groups: np.ndarray, k: int, memory: int = MEMORY
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The k best groups (identities) of each query by their closest row: (group codes, similarities), best first,
    equal similarities by the lower code."""
    n_groups = int(np.max(groups)) + 1 if len(groups) else 0
    k = min(k, n_groups)
    codes = np.empty((len(queries), k), np.int64)
    similarities = np.empty((len(queries), k), np.float32)
    for start, best in group_max_blocks(queries, gallery, groups, memory):
        codes[start:start + len(best)], similarities[start:start + len(best)] = select_top(best, k)
    return codes, similarities
