#!/usr/bin/env python
"""Where `logreg`'s seconds go on the dog-breed shape, and why its folds start from zeros (issue #14).

Parts (all by default):
  primitives  one objective evaluation's two float32 / float64 products; scipy L-BFGS-B's own cost per iteration
  starts      5-fold OOF log loss and objective evaluations: folds from zeros (what featstack does) against folds
              warm-started from the refit, which has seen their held-out rows
  parallel    the 5 folds one after another against featstack's worker processes

The features are bench_stack.py's synthetic store (9,199 training rows x 6,656 dims, 120 classes), cached in --cache.
"""
import argparse
import sys
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


def training_rows(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    data = cache / "train.npz"
    if not data.exists():
        store = write_synthetic_store(cache / "features", "dogbreed_shape", classes=120, labelled=10222,
                                      test_rows=10357, widths=WIDTHS, separation=0.3, holdout=0.1)
        fs = load_features(store.root)
        train = fs.rows("train")
        index = {c: k for k, c in enumerate(fs.classes)}
        np.savez(data, X=fs.matrix[train], y=np.array([index[label] for label in fs.labels[train]]))
    loaded = np.load(data)
    return loaded["X"], loaded["y"]


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
        w = M._lbfgs(objective, np.zeros((X.shape[1] + 1) * 120) if start is None else start, tol)
        W, b = objective.split(w)
        Zv = ((X[valid] - mean) / scale).astype(X.dtype)
        oof[valid] = M.softmax((Zv @ W.astype(X.dtype)).astype(np.float64) + b, axis=1)
    return kaggle_log_loss(y, oof), Counted.calls, time.perf_counter() - t0


def starts(X, y) -> dict:
    splits = list(M._folds(5, 0).split(X, y))
    Z, _, _ = M.standardise(X)
    Counted.calls, t0 = 0, time.perf_counter()
    refit = M._lbfgs(Counted(Z, y, 120, 1.0), np.zeros((X.shape[1] + 1) * 120), M.LOGREG_TOL)
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="primitives,starts,parallel")
    p.add_argument("--cache", default="/tmp/featstack-bench-logreg", help="where the synthetic store is kept")
    p.add_argument("--out", default="benchmarks/results/logreg_folds.json")
    a = p.parse_args()
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    X, y = training_rows(cache)
    results = {**header(), "shape": list(X.shape), "classes": 120}
    for part in a.parts.split(","):
        results[part] = {"primitives": primitives, "starts": starts, "parallel": parallel}[part](
            *((X,) if part == "primitives" else (X, y)))
        print(part, results[part], flush=True)
    write_json(results, a.out)


if __name__ == "__main__":
    main()
