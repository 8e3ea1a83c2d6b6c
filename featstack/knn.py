"""Retrieval head: the nearest identities of a photo by cosine over cached embeddings, with a "new" answer.

``KNNRetrieval`` is a scikit-learn classifier (``fit``/``predict``/``predict_proba``, so it can be a member of a
stack or blend) whose main answer is ``rank``: the top-k identities of each query, the "new" label inserted where
the best similarity falls under a threshold. The threshold and the softmax temperature are chosen on out-of-fold
queries of the training rows (``IdentityKFold``: some identities held out whole, so "new" is seen, the others
spread over the folds, so known identities are seen too); ``cross_val_map`` reports MAP@k with that choice made
again inside each of its own folds. The search itself is ``neighbours`` (exact, blocked, deterministic ties).
"""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.validation import check_array, check_is_fitted

from .neighbours import MEMORY, CosineSpace, group_max_blocks, top_k, top_k_groups

TEMPERATURES = np.geomspace(1e-3, 1.0, 31)
THRESHOLD_CANDIDATES = 256
DEFAULT_TEMPERATURE = 0.05  # only when no out-of-fold query can score it


def map_at_k(truth, ranked, k: int = 5) -> float:
    """Kaggle's MAP@k with one correct answer per query: the mean of 1/rank of the first correct answer among a
    query's first k answers, 0 when it is not among them (later repeats of the answer do not count)."""
    truth = np.asarray(truth, dtype=object)
    ranked = np.asarray(ranked, dtype=object).reshape(len(truth), -1)[:, :k]
    if not len(truth):
        return 0.0
    hit = ranked == truth[:, None]
    first = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0)
    return float(np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0).mean())


class IdentityKFold:
    """K folds for identity retrieval: rows of some identities held out whole, so their queries' answer is "new",
    and the photos of the others spread over the folds, so a held-out photo has its identity in the gallery.

    Held out whole: every identity with one photo (it cannot be in both), every row labelled ``new_label`` (not an
    identity), and a random ``holdout_share`` of the other identities (so "new" is seen even without singletons).
    """

    def __init__(self, n_splits: int = 5, holdout_share: float = 0.2, new_label=None, random_state: int = 0):
        self.n_splits = n_splits
        self.holdout_share = holdout_share
        self.new_label = new_label
        self.random_state = random_state

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return self.n_splits

    def fold_of(self, y) -> np.ndarray:
        y = np.asarray(y, dtype=object)
        if len(y) < self.n_splits:
            raise ValueError(f"{len(y)} rows cannot make {self.n_splits} folds")
        rng = np.random.default_rng(self.random_state)
        fold = np.empty(len(y), np.int64)
        sizes = np.zeros(self.n_splits, np.int64)
        is_new = (y == self.new_label) if self.new_label is not None else np.zeros(len(y), bool)
        identities, codes, counts = np.unique(y[~is_new].astype(str), return_inverse=True, return_counts=True)
        rows_of = np.split(np.flatnonzero(~is_new)[np.argsort(codes, kind="stable")], np.cumsum(counts)[:-1])
        multi = np.flatnonzero(counts > 1)
        whole_ids = np.r_[np.flatnonzero(counts == 1),
                          rng.choice(multi, int(round(self.holdout_share * len(multi))), replace=False)]
        whole = [rows_of[c] for c in whole_ids] + [np.array([r]) for r in np.flatnonzero(is_new)]
        # Whole units go, largest first, to the emptiest fold (GroupKFold's balancing), in a seeded order.
        for u in sorted(rng.permutation(len(whole)), key=lambda u: -len(whole[u])):
            f = int(np.argmin(sizes))
            fold[whole[u]] = f
            sizes[f] += len(whole[u])
        spread = np.setdiff1d(np.arange(len(identities)), whole_ids)
        next_fold = 0
        for c in rng.permutation(spread):
            rows = rng.permutation(rows_of[c])
            fold[rows] = (next_fold + np.arange(len(rows))) % self.n_splits
            next_fold = (next_fold + len(rows)) % self.n_splits
        return fold

    def split(self, X=None, y=None, groups=None):
        fold = self.fold_of(y)
        for f in range(self.n_splits):
            test = np.flatnonzero(fold == f)
            if len(test):  # an identity held out whole can outweigh a fold's share and leave another empty
                yield np.flatnonzero(fold != f), test


def expected_answers(y_train, y_query, new_label=None) -> np.ndarray:
    """A query's correct answer against a gallery of ``y_train``: its label if that identity is there, else the
    "new" label (or its own label, unreachable, when there is no "new" label)."""
    y_query = np.asarray(y_query)
    gallery = set(np.asarray(y_train).tolist()) - {new_label}
    if new_label is None:
        return y_query.copy()
    known = np.array([label in gallery for label in y_query.tolist()], bool)
    return np.where(known, y_query.astype(object), new_label).astype(object)


def insert_new(labels: np.ndarray, similarities: np.ndarray, threshold: float, new_label, k: int) -> np.ndarray:
    """Ranked identities with ``new_label`` placed before the first one whose similarity is under ``threshold``,
    cut to k answers."""
    m = len(labels)
    position = (similarities >= threshold).sum(axis=1)  # similarities are sorted, best first
    out = np.empty((m, labels.shape[1] + 1), dtype=object)
    cols = np.arange(labels.shape[1] + 1)
    before = cols[None, :] < position[:, None]
    at = cols[None, :] == position[:, None]
    padded = np.concatenate([labels, np.full((m, 1), None, dtype=object)], axis=1)
    shifted = np.concatenate([np.full((m, 1), None, dtype=object), labels], axis=1)
    out[:] = np.where(before, padded, shifted)
    out[at] = new_label
    return out[:, :k]


class KNNRetrieval(ClassifierMixin, BaseEstimator):
    """Identity retrieval by exact cosine search over training embeddings, answers aggregated per identity (an
    identity's similarity is that of its closest photo).

    Parameters: ``k`` answers per query (and the k of the MAP@k the threshold is chosen for); ``whiten`` and
    ``n_components`` for ``CosineSpace`` (fitted on the training rows); ``new_label`` the label for an identity not
    in the gallery (None: no such answer; rows with this label in ``y`` are never gallery photos, only "new"
    queries); ``threshold`` ("auto": chosen on out-of-fold queries for MAP@k, or a number); ``temperature`` of
    ``predict_proba``'s softmax over similarities ("auto": the out-of-fold log loss minimum, or a number); ``cv``,
    ``holdout_share`` and ``random_state`` of the ``IdentityKFold`` those choices use.
    """

    def __init__(self, k: int = 5, whiten: bool = False, n_components: int | float | None = None,
                 new_label=None, threshold="auto", temperature="auto", cv: int = 5, holdout_share: float = 0.2,
                 random_state: int = 0, memory: int = MEMORY):
        self.k = k
        self.whiten = whiten
        self.n_components = n_components
        self.new_label = new_label
        self.threshold = threshold
        self.temperature = temperature
        self.cv = cv
        self.holdout_share = holdout_share
        self.random_state = random_state
        self.memory = memory

    # -- fitting ------------------------------------------------------------------------------------------------

    def _labels(self, y) -> np.ndarray:
        # With a "new" label, labels are compared as Python objects (a string "new" among any labels); without,
        # they keep their dtype, so classes_ and predict match y's type as scikit-learn's stacking expects.
        y = np.asarray(y)
        return y.astype(object) if self.new_label is not None else y

    def _gallery(self, X: np.ndarray, y: np.ndarray):
        """(space, unit gallery rows, identity labels, identity code of each gallery row, gallery row indices)."""
        rows = np.flatnonzero(y != self.new_label) if self.new_label is not None else np.arange(len(y))
        if not len(rows):
            raise ValueError(f"every training row is labelled {self.new_label!r}: there is no identity to retrieve")
        space = CosineSpace(self.whiten, self.n_components, self.random_state).fit(X[rows])
        identities, codes = np.unique(y[rows], return_inverse=True)
        by_identity = np.argsort(codes, kind="stable")  # so the per-identity search needs no reordered copy
        rows, codes = rows[by_identity], codes[by_identity]
        return space, space.transform(X[rows]), identities, codes, rows

    def fit(self, X, y):
        X = check_array(X, dtype=np.float32)
        y = self._labels(y)
        if len(y) != len(X):
            raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
        self.classes_ = np.unique(np.r_[y, [self.new_label]] if self.new_label is not None else y)
        self.n_features_in_ = X.shape[1]
        self.space_, self.gallery_, self.identities_, self.gallery_codes_, self.gallery_rows_ = self._gallery(X, y)
        self.identity_columns_ = np.searchsorted(self.classes_, self.identities_)
        self.new_column_ = (int(np.searchsorted(self.classes_, self.new_label))
                            if self.new_label is not None else None)
        need_threshold = self.new_label is not None and isinstance(self.threshold, str)
        if need_threshold or isinstance(self.temperature, str):
            self.oof_ = self._out_of_fold(X, y)
        self.threshold_ = (None if self.new_label is None else
                           self._choose_threshold(self.oof_) if need_threshold else float(self.threshold))
        self.temperature_ = (self._choose_temperature(self.oof_) if isinstance(self.temperature, str)
                             else float(self.temperature))
        return self

    def _out_of_fold(self, X: np.ndarray, y: np.ndarray) -> dict:
        """Each training row queried against the gallery of the other folds: its top-k identities and similarities,
        its correct answer, and per temperature the log-sum-exp of its identity scores (for the softmax fit)."""
        n_splits = min(self.cv, len(y))
        if n_splits < 2:
            raise ValueError("at least 2 training rows are needed to choose a threshold or temperature")
        folds = IdentityKFold(n_splits, self.holdout_share, self.new_label, self.random_state)
        m, k = len(y), self.k
        sims = np.full((m, k), -np.inf, np.float32)
        answers = np.full((m, k), None, dtype=object)
        truth = np.empty(m, dtype=object)
        truth_score = np.full(m, np.nan)  # the similarity of the correct identity; NaN when the answer is "new"
        lse = np.full((m, len(TEMPERATURES)), -np.inf)
        for train, test in folds.split(X, y):
            space, gallery, identities, codes, _ = self._gallery(X[train], y[train])
            queries = space.transform(X[test])
            truth[test] = expected_answers(identities, y[test], self.new_label)
            column = {label: c for c, label in enumerate(identities.tolist())}
            truth_col = np.array([column.get(t, -1) for t in truth[test].tolist()])
            for start, best in group_max_blocks(queries, gallery, codes, self.memory):
                rows = test[start:start + len(best)]
                tc = truth_col[start:start + len(best)]
                hit = tc >= 0
                truth_score[rows[hit]] = best[np.flatnonzero(hit), tc[hit]]
                top = best.max(axis=1, keepdims=True).astype(np.float64)
                for j, temperature in enumerate(TEMPERATURES):  # one block x identities temporary at a time
                    lse[rows, j] = (top[:, 0] / temperature
                                    + np.log(np.exp((best - top) / temperature).sum(axis=1)))
            top_codes, top_sims = top_k_groups(queries, gallery, codes, k, self.memory)
            sims[test, :top_sims.shape[1]] = top_sims
            answers[test, :top_codes.shape[1]] = identities[top_codes]
        return {"answers": answers, "similarities": sims, "truth": truth, "truth_score": truth_score, "lse": lse}

    def _choose_threshold(self, oof: dict) -> float:
        """The threshold whose "new" insertion gives the best out-of-fold MAP@k (the median of those tied)."""
        sims, answers, truth, k = oof["similarities"], oof["answers"], oof["truth"], self.k
        finite = sims[np.isfinite(sims)]
        candidates = np.unique(np.r_[np.quantile(finite, np.linspace(0, 1, THRESHOLD_CANDIDATES)) if len(finite)
                                     else [], -np.inf, np.inf]).astype(np.float64)
        is_new = truth == self.new_label
        hit = answers == truth[:, None]
        rank = np.where(hit.any(axis=1), hit.argmax(axis=1), k)  # 0-based identity position; k: absent
        best_sim = np.take_along_axis(sims, np.minimum(rank, k - 1)[:, None], axis=1)[:, 0]
        scores = []
        for t in candidates:
            position = (sims >= t).sum(axis=1)  # where "new" goes (0-based)
            new_score = np.where(position < k, 1.0 / (position + 1), 0.0)
            shifted = rank + (best_sim < t)  # "new" lands before the correct identity when it is under t
            known_score = np.where((rank < k) & (shifted < k), 1.0 / (shifted + 1), 0.0)
            scores.append(np.where(is_new, new_score, known_score).mean())
        scores = np.asarray(scores)
        self.threshold_map_ = float(scores.max())
        return float(np.median(candidates[scores == scores.max()]))

    def _choose_temperature(self, oof: dict) -> float:
        """The softmax temperature with the lowest out-of-fold log loss of the correct answer."""
        lse, truth_score = oof["lse"], oof["truth_score"].copy()
        if self.new_label is not None:
            # The "new" answer's score is the threshold; it joins every query's softmax.
            is_new = oof["truth"] == self.new_label
            truth_score[is_new] = self._new_score()
            lse = np.logaddexp(lse, self._new_score() / TEMPERATURES[None, :])
        scorable = np.isfinite(truth_score)
        if not scorable.any():  # every out-of-fold identity was absent from its gallery: nothing to fit T on
            return DEFAULT_TEMPERATURE
        loss = (lse[scorable] - truth_score[scorable, None] / TEMPERATURES[None, :]).mean(axis=0)
        return float(TEMPERATURES[int(np.argmin(loss))])

    def _new_score(self) -> float:
        # An infinite threshold ("new" always first / never) as a finite score beyond every cosine similarity,
        # so the softmax stays defined and its argmax still agrees with rank.
        return float(np.clip(self.threshold_, -2.0, 2.0))

    # -- answering ----------------------------------------------------------------------------------------------

    def _queries(self, X) -> np.ndarray:
        check_is_fitted(self, "gallery_")
        return self.space_.transform(X)

    def rank(self, X, k: int | None = None) -> np.ndarray:
        """The top-k labels of each query (object array, n_queries x k), best first; "new" inserted at the
        threshold; None pads when there are fewer answers than k."""
        k = self.k if k is None else k
        codes, sims = top_k_groups(self._queries(X), self.gallery_, self.gallery_codes_, k, self.memory)
        labels = self.identities_[codes]
        if self.threshold_ is not None:
            labels = insert_new(labels, sims, self.threshold_, self.new_label, k)
        if labels.shape[1] < k:
            labels = np.concatenate([labels, np.full((len(labels), k - labels.shape[1]), None, object)], axis=1)
        return labels

    def kneighbors(self, X, n_neighbors: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """The nearest training photos (not identities): (training row indices as given to ``fit``, similarities),
        equal similarities in the order of (identity, training row)."""
        index, sims = top_k(self._queries(X), self.gallery_, n_neighbors, memory=self.memory)
        return self.gallery_rows_[index], sims

    def decision_function(self, X) -> np.ndarray:
        """Per class of ``classes_``: the similarity of its closest photo; the "new" class scores the threshold;
        a class without photos scores -inf."""
        queries = self._queries(X)
        scores = np.full((len(queries), len(self.classes_)), -np.inf, np.float64)
        for start, best in group_max_blocks(queries, self.gallery_, self.gallery_codes_, self.memory):
            scores[start:start + len(best), self.identity_columns_] = best
        if self.new_column_ is not None:
            scores[:, self.new_column_] = self._new_score()
        return scores

    def predict_proba(self, X) -> np.ndarray:
        """Softmax of ``decision_function`` at the out-of-fold temperature."""
        scaled = self.decision_function(X) / self.temperature_
        scaled -= scaled.max(axis=1, keepdims=True)
        proba = np.exp(scaled)
        return proba / proba.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        """The first answer of ``rank``."""
        return self.rank(X, 1)[:, 0]


def cross_val_map(estimator: KNNRetrieval, X, y, k: int | None = None, cv: IdentityKFold | None = None) -> dict:
    """MAP@k of ``estimator`` on held-out folds, refitted (threshold and temperature chosen again) on each fold's
    training rows only, so the reported score includes the choice of the threshold."""
    X = check_array(X, dtype=np.float32)
    y = estimator._labels(y)
    k = estimator.k if k is None else k
    cv = cv or IdentityKFold(5, estimator.holdout_share, estimator.new_label, estimator.random_state + 1)
    folds, thresholds = [], []
    ranked = np.full((len(y), k), None, dtype=object)
    truth = np.empty(len(y), dtype=object)
    for train, test in cv.split(X, y):
        model = clone(estimator).fit(X[train], y[train])
        ranked[test] = model.rank(X[test], k)
        truth[test] = expected_answers(model.identities_, y[test], estimator.new_label)
        folds.append(map_at_k(truth[test], ranked[test], k))
        thresholds.append(model.threshold_)
    return {"map": map_at_k(truth, ranked, k), "fold_map": folds, "thresholds": thresholds, "ranked": ranked,
            "truth": truth}
