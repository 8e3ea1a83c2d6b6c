"""The stackers are scikit-learn estimators a scikit-learn user can trust (issue #31): scikit-learn's own estimator
checks, labels of any kind in ``classes_``, LightGBM's early stopping on encoded labels, a stack that refuses a
matrix of the wrong width, and LightGBM's progress lines."""
import re

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.utils.estimator_checks import parametrize_with_checks

from featstack import models as M


# Small settings: the checks' datasets are tens of rows (PCA to 4 dims above 4 covers the PCA path). With folds,
# PCALightGBM's fit on every row is the plain (folds=None) fit, and its folds run in threads.
@parametrize_with_checks([M.CVLogReg(folds=2), M.PCALightGBM(pca_dims=4, pca_above=4, n_estimators=10, folds=2),
                          M.LogPool(folds=2)],
                         expected_failed_checks=M.expected_failed_checks)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def test_only_logpool_and_lightgbm_declare_failed_checks_each_with_a_reason():
    assert M.expected_failed_checks(M.CVLogReg()) == {}
    declared = {**M.expected_failed_checks(M.PCALightGBM()), **M.expected_failed_checks(M.LogPool())}
    assert declared and all(len(reason) > 40 for reason in declared.values())


def _data(seed=0, rows=150, features=12, classes=3):
    X, y = make_classification(rows, features, n_informative=6, n_classes=classes, n_clusters_per_class=1,
                               class_sep=2.0, random_state=seed)
    return X.astype(np.float32), y


LABELS = {"indices": np.array([0, 1, 2]), "5,6,7": np.array([5, 6, 7]),
          "strings": np.array(["cat", "dog", "fox"])}


def _stack(columns):
    return M.OOFStack(columns, level2="pool", folds=3)


@pytest.mark.parametrize("make", [lambda: M.CVLogReg(folds=3), lambda: M.PCALightGBM(pca_dims=None, n_estimators=40),
                                  lambda: _stack({"a": (0, 6), "b": (6, 12)})],
                         ids=["CVLogReg", "PCALightGBM", "OOFStack"])
@pytest.mark.parametrize("labels", list(LABELS), ids=list(LABELS))
def test_classes_are_the_labels_and_predict_returns_them(make, labels):
    X, y = _data()
    names = LABELS[labels]
    m = make().fit(X, names[y])
    np.testing.assert_array_equal(m.classes_, names)
    assert set(m.predict(X)) <= set(names)
    assert m.score(X, names[y]) > 0.9  # 0.0 on {5, 6, 7} when classes_ held 0..K-1


@pytest.mark.parametrize("labels", list(LABELS), ids=list(LABELS))
def test_logpool_classes_are_the_labels(labels):
    X, y = _data()
    block = np.log(np.clip(np.eye(3)[y] * 0.8 + 0.1, 1e-5, 1))  # one confident member
    names = LABELS[labels]
    m = M.LogPool(folds=3).fit(block, names[y])
    np.testing.assert_array_equal(m.classes_, names)
    assert m.score(block, names[y]) == 1.0


def test_lightgbm_early_stopping_sees_encoded_labels():
    """LightGBM 4.7's eval_X / eval_y does not encode labels: strings crashed, {5, 6, 7} stopped at round 2."""
    X, y = _data(rows=240)
    fits = {k: M.PCALightGBM(pca_dims=None, n_estimators=200).fit(X, names[y]) for k, names in LABELS.items()}
    rounds = {k: m.rounds_ for k, m in fits.items()}
    assert len(set(rounds.values())) == 1 and rounds["indices"] > 5, rounds
    for m in fits.values():
        np.testing.assert_array_equal(m.predict_proba(X), fits["indices"].predict_proba(X))


def test_lightgbm_keeps_honest_oof_equal_to_cross_val_predict():
    """With ``folds``, PCALightGBM's own OOF (its folds in threads) is scikit-learn's cross_val_predict of it."""
    from sklearn.model_selection import cross_val_predict
    X, y = _data(rows=120)
    m = M.PCALightGBM(pca_dims=None, n_estimators=30, folds=3).fit(X, y)
    plain = cross_val_predict(M.PCALightGBM(pca_dims=None, n_estimators=30), X, y, cv=M._folds(3, 0),
                              method="predict_proba")
    np.testing.assert_array_equal(m.oof_, plain)
    np.testing.assert_array_equal(m.predict_proba(X), M.PCALightGBM(pca_dims=None, n_estimators=30).fit(X, y)
                                  .predict_proba(X))


def test_sample_weight_reaches_logistic_regression_and_lightgbm():
    """Weight 0 on half the rows is those rows left out (logreg's refit; LightGBM up to its held-out tenth)."""
    X, y = _data(rows=160)
    w = np.tile([1.0, 0.0], 80)
    kept = w > 0
    a = M.CVLogReg(folds=2).fit(X, y, sample_weight=w)
    b = M.CVLogReg(folds=2).fit(X[kept], y[kept])
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=1e-3)  # float32 lbfgs
    plain = M.PCALightGBM(pca_dims=None, n_estimators=30).fit(X, y).predict_proba(X)
    weighted = M.PCALightGBM(pca_dims=None, n_estimators=30).fit(X, y, sample_weight=w).predict_proba(X)
    assert np.abs(weighted - plain).max() > 1e-3


def test_a_stack_refuses_a_matrix_of_the_wrong_width():
    X, y = _data()
    columns = {"a": (0, 6), "b": (6, 10)}  # 10 columns; X has 12
    with pytest.raises(ValueError, match="X has 12 features, but the backbones' columns"):
        _stack(columns).fit(X, y)
    m = _stack(columns).fit(X[:, :10], y)
    with pytest.raises(ValueError, match="features"):
        m.predict_proba(X)
    blend = M.Blend(columns, folds=3).fit(X[:, :10], y)
    with pytest.raises(ValueError, match="features"):
        blend.predict_proba(X[:, :9])


def test_lightgbm_says_its_round_at_least_every_interval(monkeypatch):
    """Issue #32: `--model lgbm` was silent 145 s on a loaded machine. A fake clock that advances 4 s per reading
    (one a round): a line with the running fits' rounds never more than 10 s (+ one tick) of it after the last;
    none with the real clock on a fit this quick."""
    X, y = _data(rows=120)
    readings = []

    def clock():
        readings.append(4.0 * len(readings))
        return readings[-1]

    lines = []
    monkeypatch.setattr(M, "_clock", clock)
    with M.progress(lines.append):
        M.PCALightGBM(pca_dims=None, n_estimators=40, folds=2).fit(X, y)
    said = [float(re.search(r"\((\d+) s\)$", line).group(1)) for line in lines if " round " in line]
    assert len(readings) > 60 and said, lines
    assert np.diff([0.0, *said, readings[-1]]).max() <= 12.0, said
    assert any("fold 1 round" in line for line in lines) and any("refit round" in line for line in lines)
    monkeypatch.undo()
    quiet = []
    with M.progress(quiet.append):
        M.PCALightGBM(pca_dims=None, n_estimators=40, folds=2).fit(X, y)
    assert not [line for line in quiet if " round " in line]
