#!/usr/bin/env python
"""Where `logreg`'s seconds go on the dog-breed shape, and why its folds start from zeros (issue #14).

Parts (all by default):
  primitives  one objective evaluation's two float32 / float64 products; scipy L-BFGS-B's own cost per iteration
  starts      5-fold OOF log loss and objective evaluations: folds from zeros (what featstack does) against folds
              warm-started from the refit, which has seen their held-out rows
  parallel    the 5 folds one after another against featstack's worker processes
  threads     two folds one after another against two threads
  tolerances  scikit-learn lbfgs from zeros at looser tolerances: iterations, OOF and holdout log loss
  runfolder   the 120-class confusion plot; the test predictions CSV as written and at 9 significant digits
  tree        honest warm starts, one TreeCV level: folds 1-2 start from a fit on folds 3-5 and folds 3-5 from one on
              folds 1-2 (neither saw the rows it will score); scikit-learn lbfgs iterations and OOF log loss

The features are bench_stack.py's synthetic store (9,199 training rows x 6,656 dims, 120 classes), cached in --cache.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, write_json  # noqa: E402

from featstack import models as M  # noqa: E402
from featstack.features import load_features  # noqa: E402
from featstack.reports import kaggle_log_loss  # noqa: E402
from featstack.synthetic import write_synthetic_store  # noqa: E402

WIDTHS = {"xception": 2048, "inception_v3": 2048, "resnet50": 2048, "vgg16": 512}


def training_rows(cache: Path):
    data = cache / "train.npz"
    if not data.exists():
        store = write_synthetic_store(cache / "features", "dogbreed_shape", classes=120, labelled=10222,
                                      test_rows=10357, widths=WIDTHS, separation=0.3, holdout=0.1)
        fs = load_features(store.root)
        train, holdout = fs.rows("train"), fs.rows("holdout")
        index = {c: k for k, c in enumerate(fs.classes)}
        np.savez(data, X=fs.matrix[train], y=np.array([index[label] for label in fs.labels[train]]),
                 Xh=fs.matrix[holdout], yh=np.array([index[label] for label in fs.labels[holdout]]))
    return np.load(data)


def timed(fn, repeat=3) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def primitives(X) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for dtype in (np.float32, np.float64):
        Z, W = X.astype(dtype), rng.standard_normal((X.shape[1], 120)).astype(dtype)
        G = rng.standard_normal((len(X), 120)).astype(dtype)
        out[f"products_{np.dtype(dtype).name}_s"] = timed(lambda Z=Z, W=W: Z @ W) + timed(lambda Z=Z, G=G: Z.T @ G)
    from scipy.optimize import minimize
    n = (X.shape[1] + 1) * 120
    diag = rng.uniform(1, 30, n)
    cheap = lambda w: (0.5 * (diag * w * w).sum() - w.sum(), diag * w - 1)  # noqa: E731
    t0 = time.perf_counter()
    res = minimize(cheap, np.zeros(n), jac=True, method="L-BFGS-B", options={"maxiter": 30, "gtol": 0, "ftol": 0})
    out["lbfgsb_overhead_per_iteration_s"] = (time.perf_counter() - t0) / res.nit
    out["lbfgsb_variables"] = n
    return out


class Counted(M.SoftmaxObjective):
    calls = 0

    def __call__(self, w):
        Counted.calls += 1
        return super().__call__(w)


def fold_oof(X, y, splits, start, tol) -> tuple[float, int, float]:
    """OOF log loss, objective evaluations and seconds of 5 folds, each from ``start`` (None: zeros)."""
    Counted.calls, t0 = 0, time.perf_counter()
    oof = np.zeros((len(y), 120))
    for train, valid in splits:
        Z, mean, scale = M.standardise(X, train)
        objective = Counted(Z, y[train], 120, 1.0)
        w, _ = M._lbfgs(objective, np.zeros((X.shape[1] + 1) * 120) if start is None else start, tol)
        oof[valid] = objective.predict_proba(((X[valid] - mean) / scale).astype(X.dtype), w)
    return kaggle_log_loss(y, oof), Counted.calls, time.perf_counter() - t0


def starts(X, y) -> dict:
    splits = list(M._folds(5, 0).split(X, y))
    Z, _, _ = M.standardise(X)
    Counted.calls, t0 = 0, time.perf_counter()
    refit, _ = M._lbfgs(Counted(Z, y, 120, 1.0), np.zeros((X.shape[1] + 1) * 120), M.LOGREG_TOL)
    out = {"refit_from_zeros": {"evaluations": Counted.calls, "seconds": time.perf_counter() - t0}}
    del Z
    for name, start, tol in (("folds_from_zeros_tol1e-6", None, 1e-6), ("folds_from_refit_tol1e-6", refit, 1e-6),
                             ("folds_from_refit_tol1e-5", refit, 1e-5)):
        loss, evals, seconds = fold_oof(X, y, splits, start, tol)
        out[name] = {"oof_log_loss": loss, "evaluations": evals, "seconds": seconds}
        print(f"{name:<28} OOF log loss {loss:.4f}  {evals:>4} evaluations  {seconds:6.1f} s", flush=True)
    return out


def parallel(X, y) -> dict:
    out = {}
    for n_jobs in (1, 2):
        t0 = time.perf_counter()
        M.CVLogReg(n_jobs=n_jobs).fit(X, y)
        out[f"cvlogreg_n_jobs{n_jobs}_s"] = time.perf_counter() - t0
        print(f"CVLogReg n_jobs={n_jobs}: {out[f'cvlogreg_n_jobs{n_jobs}_s']:.1f} s (5 folds + refit)", flush=True)
    return out


def threads(X, y) -> dict:
    from joblib import Parallel, delayed
    splits = list(M._folds(5, 0).split(X, y))[:2]
    out = {}
    for n_jobs in (1, 2):
        t0 = time.perf_counter()
        Parallel(n_jobs=n_jobs, prefer="threads")(
            delayed(M._fold_path)(X, y, train, valid, (1.0,), M.LOGREG_TOL, 120) for train, valid in splits)
        out[f"two_folds_threads{n_jobs}_s"] = time.perf_counter() - t0
    return out


def _sklearn_fit(X, y, rows, tol, start=None):
    from sklearn.linear_model import LogisticRegression
    Z, mean, scale = M.standardise(X, rows)
    lr = LogisticRegression(C=1.0, tol=tol, max_iter=M.LOGREG_MAX_ITER)
    if start is not None:
        lr.set_params(warm_start=True)
        lr.coef_, lr.intercept_ = start.coef_.copy(), start.intercept_.copy()
    return lr.fit(Z, y[rows]), mean, scale


def _sklearn_oof(X, y, tol, starts=None) -> tuple[float, list[int]]:
    oof, iterations = np.zeros((len(y), 120)), []
    for k, (train, valid) in enumerate(M._folds(5, 0).split(X, y)):
        lr, mean, scale = _sklearn_fit(X, y, train, tol, starts[k] if starts else None)
        oof[valid] = lr.predict_proba(((X[valid] - mean) / scale).astype(X.dtype))
        iterations.append(int(lr.n_iter_[0]))
    return kaggle_log_loss(y, oof), iterations


def tolerances(X, y, Xh, yh) -> dict:
    out = {}
    for tol in (1e-4, 3e-5, 1e-5, 1e-6):
        loss, iterations = _sklearn_oof(X, y, tol)
        refit, mean, scale = _sklearn_fit(X, y, slice(None), tol)
        holdout = kaggle_log_loss(yh, refit.predict_proba(((Xh - mean) / scale).astype(X.dtype)))
        out[f"{tol:g}"] = {"fold_iterations": iterations, "oof_log_loss": loss, "refit_iterations":
                           int(refit.n_iter_[0]), "holdout_log_loss": holdout}
        print(f"tol {tol:g}: {out[f'{tol:g}']}", flush=True)
    return out


def tree(X, y) -> dict:
    valid = [v for _, v in M._folds(5, 0).split(X, y)]
    first, rest = np.sort(np.concatenate(valid[:2])), np.sort(np.concatenate(valid[2:]))
    on_rest, _, _ = _sklearn_fit(X, y, rest, M.LOGREG_TOL)  # a start for folds 1-2: it never saw their rows
    on_first, _, _ = _sklearn_fit(X, y, first, M.LOGREG_TOL)
    loss, iterations = _sklearn_oof(X, y, M.LOGREG_TOL, [on_rest] * 2 + [on_first] * 3)
    return {"start_on_folds_3_5_iterations": int(on_rest.n_iter_[0]), "start_on_folds_1_2_iterations":
            int(on_first.n_iter_[0]), "fold_iterations": iterations, "oof_log_loss": loss}


def runfolder() -> dict:
    from featstack import reports
    rng = np.random.default_rng(0)
    classes = [f"breed_name_{k:03d}" for k in range(120)]
    y, proba = rng.integers(0, 120, 1023), rng.dirichlet(np.ones(120), 1023)
    with tempfile.TemporaryDirectory() as tmp:
        out = {"confusion_png_s": timed(lambda: reports.plot_confusion(y, proba, classes, Path(tmp) / "c.png", "t"), 1)}
        frame = reports.predictions_frame([f"id{k}" for k in range(10357)], rng.dirichlet(np.ones(120), 10357), classes)
        for name, fmt in (("test_csv_as_written_s", None), ("test_csv_9_digits_s", "%.9g")):
            out[name] = timed(lambda fmt=fmt: frame.to_csv(Path(tmp) / "t.csv", index=False, float_format=fmt), 1)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="primitives,starts,parallel,threads,tolerances,tree,runfolder")
    p.add_argument("--cache", default="/tmp/featstack-bench-logreg", help="where the synthetic store is kept")
    p.add_argument("--out", default="benchmarks/results/logreg_folds.json")
    a = p.parse_args()
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    data = training_rows(cache)
    X, y = data["X"], data["y"]
    results = {**header(), "shape": list(X.shape), "classes": 120}
    parts = {"primitives": lambda: primitives(X), "starts": lambda: starts(X, y), "parallel": lambda: parallel(X, y),
             "threads": lambda: threads(X, y), "tolerances": lambda: tolerances(X, y, data["Xh"], data["yh"]),
             "tree": lambda: tree(X, y), "runfolder": runfolder}
    for part in a.parts.split(","):
        results[part] = parts[part]()
        print(part, results[part], flush=True)
    write_json(results, a.out)


if __name__ == "__main__":
    main()
