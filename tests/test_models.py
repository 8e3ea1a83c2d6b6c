"""Stacker models: the fast logistic regression equals a plain sklearn fit, the blend's simplex weights and honest CV,
--C auto, and --select's ranking of backbones."""
import json
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from featstack import models as M
from featstack.blend import blend_oof, blend_weights
from featstack.errors import FeatstackError
from featstack.features import load_features
from featstack.paths import RunPaths
from featstack.selection import run_select
from featstack.stack import run_stack
from featstack.store import EntryWriter
from featstack.synthetic import write_synthetic_store


def _xy(store):
    fs = load_features(store.root)
    train = fs.rows("train")
    classes = fs.classes
    return fs.matrix[train], np.array([classes.index(l) for l in fs.labels[train]]), fs


@pytest.fixture(scope="module")
def noisy_store(tmp_path_factory):
    """Two informative backbones and one of pure noise (its extraction seconds recorded, the others' not)."""
    store = write_synthetic_store(tmp_path_factory.mktemp("f"), "synth", classes=5, per_class=40, separation=0.6,
                                  widths={"resnet50": 48, "vgg16": 32})
    ids = pd.read_csv(store.split_csv, dtype=str)["id"].tolist()
    writer = EntryWriter(store, "noise_synthetic", {})
    writer.add(ids, np.random.default_rng(1).random((len(ids), 32), dtype=np.float32))
    writer.attrs = {"backbone": "noise", "input_size": 224, "pooling": "avg", "tta": "none", "precision": "float32",
                    "weights": "random", "width": 32, "extract_seconds": 12.5}
    writer.merge()
    return store


def test_fast_logreg_equals_plain_sklearn(tmp_path):
    X, y, _ = _xy(write_synthetic_store(tmp_path, "s", classes=4, per_class=30, separation=0.5))
    X = X.astype(np.float64)  # float32 gradients would blur the comparison at 1e-4
    X_new = X[::3] + 0.1
    plain = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, tol=1e-8, max_iter=2000))
    fast = M.CVLogReg(C=0.5, folds=3, seed=0, tol=1e-8).fit(X, y)
    np.testing.assert_allclose(fast.predict_proba(X_new), plain.fit(X, y).predict_proba(X_new), atol=1e-4)
    cold = cross_val_predict(plain, X, y, cv=StratifiedKFold(3, shuffle=True, random_state=0), method="predict_proba")
    np.testing.assert_allclose(fast.oof_, cold, atol=1e-4)


def test_a_fold_never_sees_the_rows_it_scores(tmp_path):
    """Shuffling the features among fold 0's held-out rows must leave fold 0's model exactly as it was, so its OOF
    rows are shuffled the same way and otherwise unchanged. A fold warm-started from the refit (which saw those
    rows) fails this: its start, and so where lbfgs stops, moves with them."""
    X, y, _ = _xy(write_synthetic_store(tmp_path, "s", classes=4, per_class=40, separation=0.5))
    held_out = next(iter(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y)))[1]
    shuffled = np.random.default_rng(0).permutation(held_out)
    X_shuffled = X.copy()
    X_shuffled[held_out] = X[shuffled]
    before = M.CVLogReg(folds=3, seed=0).fit(X, y).oof_
    after = M.CVLogReg(folds=3, seed=0).fit(X_shuffled, y).oof_
    assert not np.allclose(after, before)  # the other folds trained on the shuffled rows, and changed
    by_row = dict(zip(held_out, shuffled))
    np.testing.assert_allclose(after[held_out], before[[by_row[r] for r in held_out]], rtol=0, atol=1e-12)


def test_parallel_folds_equal_sequential_ones(tmp_path):
    X, y, _ = _xy(write_synthetic_store(tmp_path, "s", classes=3, per_class=30, separation=0.5))
    one, two = (M.CVLogReg(folds=3, n_jobs=n).fit(X, y) for n in (1, 2))
    np.testing.assert_array_equal(one.oof_, two.oof_)
    np.testing.assert_array_equal(one.predict_proba(X), two.predict_proba(X))


def test_blend_weights_on_the_simplex():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 300)
    probas = [rng.dirichlet(np.ones(6), 300) for _ in range(4)]
    probas[2][np.arange(300), y] += 1.0  # one informative model among noise
    probas[2] /= probas[2].sum(axis=1, keepdims=True)
    w = blend_weights(probas, y)
    assert (w >= 0).all() and w.sum() == pytest.approx(1, abs=1e-9)
    assert w[2] > 0.9


def test_blend_cv_never_fits_weights_on_the_rows_it_scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    probas = [rng.dirichlet(np.ones(3), 200) for _ in range(3)]
    splits = list(StratifiedKFold(4, shuffle=True, random_state=0).split(y, y))
    out, fold_weights = blend_oof(probas, y, splits)
    scored = splits[0][1]
    y_changed = y.copy()
    y_changed[scored] = (y[scored] + 1) % 3  # other labels on the scored rows only
    changed, _ = blend_oof(probas, y_changed, splits)
    np.testing.assert_array_equal(out[scored], changed[scored])
    assert len(fold_weights) == 4 and all(w.sum() == pytest.approx(1) for w in fold_weights)


def test_blend_gives_noise_backbone_near_zero_weight(tmp_path, noisy_store, capsys):
    run = RunPaths(run_stack(noisy_store.root, model="blend", models_dir=tmp_path))
    weights = json.loads(run.report_json.read_text())["blend_weights"]
    assert sorted(weights) == ["noise", "resnet50", "vgg16"]
    assert all(w >= 0 for w in weights.values()) and sum(weights.values()) == pytest.approx(1, abs=1e-9)
    assert weights["noise"] < 0.05, weights
    assert "blend weights: noise 0.0" in capsys.readouterr().out
    assert "blend weights: noise" in run.report_md.read_text()


def test_select_ranks_noise_last_with_extraction_seconds(tmp_path, noisy_store):
    root = run_select(noisy_store.root, models_dir=tmp_path, run_id="sel")
    table = pd.read_csv(root / "selection.csv")
    assert list(table.columns) == ["step", "backbone", "alone_log_loss", "blended_log_loss", "weights",
                                   "extract_seconds", "width"]
    assert table.backbone.iloc[-1] == "noise" and sorted(table.backbone) == ["noise", "resnet50", "vgg16"]
    assert table.blended_log_loss.iloc[1] < table.blended_log_loss.iloc[0]  # the second signal backbone helps
    by_name = table.set_index("backbone")
    assert by_name.loc["noise", "extract_seconds"] == 12.5 and np.isnan(by_name.loc["resnet50", "extract_seconds"])
    # Greedy step 1 is the best backbone alone.
    assert table.backbone.iloc[0] == table.sort_values("alone_log_loss").backbone.iloc[0]


def test_C_auto_larger_when_separable_smaller_when_noise(tmp_path):
    X_sep, y_sep, _ = _xy(write_synthetic_store(tmp_path, "sep", classes=3, per_class=30, separation=3.0))
    X_noise, y_noise, _ = _xy(write_synthetic_store(tmp_path, "noise", classes=3, per_class=30, random_labels=True))
    sep = M.CVLogReg(C="auto").fit(X_sep, y_sep)
    noise = M.CVLogReg(C="auto").fit(X_noise, y_noise)
    assert sep.C_ > noise.C_, (sep.C_grid_, noise.C_grid_)
    assert sorted(sep.C_grid_) == sorted(M.C_GRID)


def test_C_auto_in_the_report(tmp_path):
    store = write_synthetic_store(tmp_path / "f", "s", classes=3, per_class=20)
    run = RunPaths(run_stack(store.root, model="logreg", C="auto", models_dir=tmp_path / "m"))
    report = json.loads(run.report_json.read_text())
    choice = report["C"]["logreg"]
    assert set(choice["grid"]) == {f"{c:g}" for c in M.C_GRID}
    assert choice["grid"][f"{choice['C']:g}"] == min(choice["grid"].values())
    assert "chosen by 5-fold CV" in run.report_md.read_text()


@pytest.mark.parametrize("C, match", [("abc", "--C abc: give a positive number or auto"),
                                      ("0", "--C 0: give a positive number"), ("-1", "--C -1: give a positive"),
                                      ("nan", "--C nan: give a positive")])
def test_bad_C(tmp_path, C, match):
    with pytest.raises(FeatstackError, match=match):
        run_stack(tmp_path, C=C)


def test_extraction_records_seconds(demo):
    for path in demo["features"].glob("*.h5"):
        with h5py.File(path, "r") as f:
            assert f.attrs["extract_seconds"] > 0


def test_fast_logreg_equals_plain_sklearn_on_two_classes(tmp_path):
    """scikit-learn fits two classes with a single logit; the fast folds must give the same model."""
    X, y, _ = _xy(write_synthetic_store(tmp_path, "s", classes=2, per_class=40, separation=0.5))
    X = X.astype(np.float64)
    plain = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, tol=1e-8, max_iter=2000))
    fast = M.CVLogReg(C=0.5, folds=3, seed=0, tol=1e-8).fit(X, y)
    np.testing.assert_allclose(fast.predict_proba(X), plain.fit(X, y).predict_proba(X), atol=1e-4)
    cold = cross_val_predict(plain, X, y, cv=StratifiedKFold(3, shuffle=True, random_state=0), method="predict_proba")
    np.testing.assert_allclose(fast.oof_, cold, atol=1e-4)


def test_fits_at_their_iteration_limit_are_one_line_not_python_warnings(tmp_path, monkeypatch, capsys):
    store = write_synthetic_store(tmp_path / "f", "s", classes=3, per_class=20)
    monkeypatch.setattr(M, "LOGREG_MAX_ITER", 2)
    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        run_stack(store.root, model="logreg", models_dir=tmp_path / "m")
    assert not [w for w in leaked if issubclass(w.category, ConvergenceWarning)]
    out, err = capsys.readouterr()
    notes = [line for line in out.splitlines() if line.startswith("note: logistic regression stopped")]
    assert len(notes) == 1 and "2-iteration limit" in notes[0] and "--C" in notes[0]
    assert "ConvergenceWarning" not in err and "Warning" not in out.replace(notes[0], "")
