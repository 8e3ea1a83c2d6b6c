"""Retrieval: the one exact cosine search (same neighbours as scikit-learn's brute force and as audit.py's own),
deterministic ties, bounded blocks, whitening fitted on the gallery only, MAP@k, and the KNNRetrieval head with its
"new" threshold chosen out of fold and inside the CV that reports it."""
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.ensemble import StackingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.neighbors import NearestNeighbors

from featstack.audit import Neighbours
from featstack.knn import IdentityKFold, KNNRetrieval, cross_val_map, expected_answers, map_at_k
from featstack.neighbours import CosineSpace, block_rows, select_top, top_k, top_k_groups, unit_rows


def _rows(n, d=24, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def identity_world(identities=40, d=32, noise=0.55, seed=0, new_share=0.25):
    """Photos as identity centre + noise (1-4 photos each); ``new_share`` of the identities only appear as
    queries."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, d))
    X, y = [], []
    for i in range(identities):
        for _ in range(rng.integers(1, 5)):
            X.append(centres[i] + noise * rng.normal(size=d))
            y.append(f"id{i:03d}")
    X, y = np.asarray(X, np.float32), np.asarray(y, object)
    new_ids = {f"id{i:03d}" for i in rng.choice(identities, int(new_share * identities), replace=False)}
    return X, y, np.array([label in new_ids for label in y])


def test_top_k_matches_sklearn_brute_force_cosine_in_any_block_size():
    gallery, queries = _rows(300), _rows(45, seed=1)
    distances, expected = NearestNeighbors(n_neighbors=8, metric="cosine", algorithm="brute").fit(
        gallery).kneighbors(queries)
    for memory in (16 * 300, 16 * 300 * 7, 2 ** 30):  # one query per block, 7 per block, all in one
        index, sims = top_k(unit_rows(queries), unit_rows(gallery), 8, memory=memory)
        np.testing.assert_array_equal(index, expected)
        np.testing.assert_allclose(sims, 1 - distances, atol=1e-5)
    assert block_rows(300, 16 * 300 * 7) == 7


def test_top_k_breaks_ties_by_lower_gallery_index_whatever_the_block():
    base = _rows(20, seed=2)
    gallery = unit_rows(np.concatenate([base, base, base]))  # rows i, i+20, i+40 identical
    queries = gallery[[5, 13]]
    for memory in (16 * 60, 2 ** 30):
        index, sims = top_k(queries, gallery, 3, memory=memory)
        np.testing.assert_array_equal(index, [[5, 25, 45], [13, 33, 53]])
        np.testing.assert_allclose(sims, 1, atol=1e-6)
    # A tie straddling the k-th place: the lower columns win, listed in order.
    cols, top = select_top(np.array([[0.5, 0.9, 0.5, 0.5, 0.1]], np.float32), 3)
    np.testing.assert_array_equal(cols, [[1, 0, 2]])


def test_top_k_replaces_audits_blocked_search_with_the_same_results():
    rows = unit_rows(_rows(400, d=16, seed=3))
    old = Neighbours(rows, k=10, block=64)
    index, sims = top_k(rows, rows, 10, exclude=np.arange(len(rows)), memory=16 * 400 * 50)
    assert old.k == index.shape[1] == 10
    np.testing.assert_array_equal(index, old.indices)
    np.testing.assert_allclose(np.maximum(1 - sims, 0), old.distances, atol=1e-6)
    assert not (index == np.arange(len(rows))[:, None]).any()
    # Fewer rows than k + 1: every other row, as audit's k = min(k, n - 1).
    index, _ = top_k(rows[:4], rows[:4], 10, exclude=np.arange(4))
    assert index.shape == (4, 3)


def test_whitening_is_fitted_on_the_gallery_rows_only():
    gallery, queries = _rows(200, d=12, seed=4) + 3.0, _rows(50, d=12, seed=5) * 10 - 7
    space = CosineSpace(whiten=True).fit(gallery)
    before = space.transform(gallery)
    space.transform(queries)
    np.testing.assert_array_equal(space.transform(gallery), before)
    np.testing.assert_allclose(space.mean_, unit_rows(gallery).mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(space.transform(queries), axis=1), 1, atol=1e-5)
    # Whitened, the gallery's spread is the same in every direction (before the final normalisation).
    white = (unit_rows(gallery) - space.mean_) @ space.projection_
    np.testing.assert_allclose(np.cov(white.T), np.eye(white.shape[1]), atol=0.02)


def _kaggle_apk(actual, predicted, k):
    # Independent: the Kaggle "average precision at k" of ml_metrics, one relevant item per query.
    predicted = list(predicted)[:k]
    score, hits = 0.0, 0.0
    for i, p in enumerate(predicted):
        if p == actual and p not in predicted[:i]:
            hits += 1.0
            score += hits / (i + 1.0)
    return score


def test_map_at_k_is_kaggles_definition():
    rng = np.random.default_rng(6)
    labels = np.array(["a", "b", "c", "d", "e", "f", "new"], object)
    truth = rng.choice(labels, 200)
    ranked = np.array([rng.permutation(labels)[:5] for _ in range(200)], object)
    ranked[:10, 2] = ranked[:10, 1]  # a repeated answer does not count twice
    expected = np.mean([_kaggle_apk(t, r, 5) for t, r in zip(truth, ranked)])
    assert map_at_k(truth, ranked, 5) == pytest.approx(expected)
    assert map_at_k(truth, ranked, 1) == pytest.approx(accuracy_score(truth, ranked[:, 0]))
    assert map_at_k(["x"], [["y", "z", "x"]], 2) == 0
    assert map_at_k(["x"], [["y", "z", "x"]], 3) == pytest.approx(1 / 3)


def test_identity_folds_hold_out_whole_identities_and_keep_others_known():
    _, y, _ = identity_world(60, seed=7)
    y = np.r_[y, ["new"] * 5].astype(object)
    cv = IdentityKFold(4, holdout_share=0.25, new_label="new")
    fold = cv.fold_of(y)
    assert np.array_equal(fold, cv.fold_of(y))  # seeded
    new_seen = known_seen = 0
    for train, test in cv.split(None, y):
        answers = expected_answers(y[train], y[test], "new")
        new_seen += (answers == "new").sum()
        known_seen += (answers != "new").sum()
    assert new_seen and known_seen
    # Few identities, one of them large and held out whole: no empty fold is handed out, and fit still works.
    lopsided = np.array(["a"] * 8 + ["b", "c"], object)
    assert all(len(test) for _, test in IdentityKFold(5, holdout_share=1.0).split(None, lopsided))
    KNNRetrieval(new_label="new", holdout_share=1.0).fit(_rows(10, d=4, seed=16), lopsided)
    labels, counts = np.unique(y[y != "new"], return_counts=True)
    whole = [lab for lab in labels if len(set(fold[y == lab])) == 1]
    assert set(labels[counts == 1]) <= set(whole)  # a single photo is held out whole, so its answer is "new"
    assert len(whole) > (counts == 1).sum()  # and a share of the others too


def _brute_class_scores(model, X):
    # Independent: cosine of every query to every training photo, max per identity.
    g, q = model.gallery_, model.space_.transform(X)
    sims = q @ g.T
    return {label: sims[:, model.gallery_codes_ == c].max(axis=1) for c, label in enumerate(model.identities_)}


def test_knn_ranks_identities_by_their_closest_photo_with_new_at_the_threshold():
    X, y, is_new = identity_world(50, seed=8)
    model = KNNRetrieval(new_label="new").fit(X[~is_new], y[~is_new])
    assert list(model.classes_) == sorted(set(y[~is_new]) | {"new"})
    assert model.threshold_ is not None and 0 < model.temperature_ <= 1
    scores = _brute_class_scores(model, X)
    ranked = model.rank(X, 5)
    table = np.column_stack([scores[label] for label in model.identities_])
    for r in range(len(X)):
        order = [model.identities_[c] for c in np.lexsort((np.arange(table.shape[1]), -table[r]))]
        before = [o for o in order if scores[o][r] >= model.threshold_]  # a prefix: order is by score
        expected = (before + ["new"] + order[len(before):])[:5]
        assert list(ranked[r]) == expected
    proba = model.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1)
    np.testing.assert_array_equal(model.classes_[proba.argmax(axis=1)], model.predict(X))
    index, sims = model.kneighbors(X[:3], 4)
    brute = model.space_.transform(X[:3]) @ model.gallery_.T
    np.testing.assert_allclose(sims, np.sort(brute, axis=1)[:, ::-1][:, :4], atol=1e-6)
    np.testing.assert_array_equal(y[~is_new][index][:, 0], y[:3])


def test_new_threshold_is_chosen_inside_the_cv_and_beats_all_new():
    X, y, is_new = identity_world(60, seed=9)
    estimator = KNNRetrieval(new_label="new", cv=4)
    cv = IdentityKFold(4, holdout_share=0.25, new_label="new", random_state=3)
    result = cross_val_map(estimator, X, y, 5, cv)
    train, test = next(cv.split(X, y))
    assert result["thresholds"][0] == clone(estimator).fit(X[train], y[train]).threshold_
    all_new = map_at_k(result["truth"], np.full((len(y), 1), "new", object), 5)
    assert 0 < all_new < result["map"]
    no_new = cross_val_map(KNNRetrieval(), X, y, 5, cv)
    assert result["map"] > map_at_k(result["truth"], no_new["ranked"], 5)
    # An infinite threshold ranks "new" first and keeps the probabilities finite, their argmax "new" too.
    always = KNNRetrieval(new_label="new", threshold=np.inf, temperature=0.1).fit(X, y)
    assert (always.rank(X[:5])[:, 0] == "new").all() and (always.predict(X[:5]) == "new").all()
    proba = always.predict_proba(X[:5])
    assert np.isfinite(proba).all() and (always.classes_[proba.argmax(axis=1)] == "new").all()
    # Fixed threshold and temperature: nothing chosen, no out-of-fold search.
    fixed = KNNRetrieval(new_label="new", threshold=0.5, temperature=0.1).fit(X, y)
    assert (fixed.threshold_, fixed.temperature_) == (0.5, 0.1) and not hasattr(fixed, "oof_")


def test_rows_labelled_new_are_queries_never_gallery_photos():
    X, y, is_new = identity_world(30, seed=10)
    y = np.where(is_new, "new", y).astype(object)
    model = KNNRetrieval(new_label="new").fit(X, y)
    assert "new" not in set(model.identities_) and len(model.gallery_) == (~is_new).sum()
    assert (model.oof_["truth"][is_new] == "new").all()


def test_knn_is_a_stacking_member_for_classification():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 3, 150)
    X = (np.eye(3)[y] @ rng.normal(size=(3, 16)) * 2 + rng.normal(size=(150, 16))).astype(np.float32)
    model = KNNRetrieval().fit(X, y)
    assert model.classes_.dtype == y.dtype and model.threshold_ is None
    assert model.score(X[:100], y[:100]) > 0.9
    stack = StackingClassifier([("knn", KNNRetrieval())], LogisticRegression(), cv=3).fit(X[:100], y[:100])
    assert stack.score(X[100:], y[100:]) > 0.8


def test_top_k_groups_counts_an_identity_once():
    gallery = unit_rows(_rows(30, seed=12))
    groups = np.arange(30) % 4
    codes, sims = top_k_groups(gallery[:5], gallery, groups, 3)
    assert codes.shape == (5, 3) and all(len(set(row)) == 3 for row in codes.tolist())
    np.testing.assert_array_equal(codes[:, 0], groups[:5])
    np.testing.assert_allclose(sims[:, 0], 1, atol=1e-6)


def test_top_k_peak_memory_grows_with_the_gallery_not_the_queries():
    import tracemalloc

    def peak(queries, gallery):
        tracemalloc.start()
        top_k(queries, gallery, 5, memory=16 * len(gallery) * 8)  # 8 queries per block
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return size

    gallery = unit_rows(_rows(4000, d=8, seed=13))
    few, many = unit_rows(_rows(16, d=8, seed=14)), unit_rows(_rows(1600, d=8, seed=15))
    blocks = 16 * len(gallery) * 8
    outputs = len(many) * 5 * 12  # the answers themselves: int64 index + float32 similarity per neighbour
    assert peak(many, gallery) < peak(few, gallery) + outputs + blocks // 4
    assert peak(few, gallery) < 1.5 * blocks  # one block of temporaries, not queries x gallery
