#!/usr/bin/env python
"""LightGBM's defaults (issue #32): holdout log loss of PCALightGBM configurations against logreg on three realistic
worlds of benchmarks/worlds.py: "similar" and "strong_weak" (issue #19's) and "pooled" (spatially pooled patch
features, each backbone good alone).

Each configuration is the estimator `stack.py --model lgbm` fits (standardise, optional PCA, early stopping on a
stratified tenth of the training rows, refit on every training row at the found round count) with some parameters
changed; logreg is `stack.py --model logreg` (CVLogReg, C = 1, its refit). Both are fitted on the store's training
rows (the concatenation of every backbone) and scored on its holdout rows. Quality only: log loss ratios do not
depend on the machine's load; the seconds do (CPU seconds of this process, LightGBM on one thread).

    python benchmarks/bench_lgbm.py --configs default,hand --worlds similar,strong_weak,pooled
"""
import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, write_json  # noqa: E402
from worlds import write_world_store  # noqa: E402

from featstack import models as M  # noqa: E402
from featstack.features import load_features  # noqa: E402
from featstack.reports import kaggle_log_loss  # noqa: E402

# PCALightGBM parameters changed from its defaults (raw features up to 2,048 dims, a fifth of them a tree), one knob
# at a time, then combinations. Results files name the commit's defaults they were measured from (BENCHMARKS.md).
CONFIGS = {
    "default": {},
    # the default before issue #32: PCA to 128 dims above 128, half the features a tree (results/lgbm_defaults_*.json's
    # "default"); results/lgbm_new_default.json's "default" and lgbm_raw_*.json's baseline were raw_ff0.5
    "old_default": {"pca_above": 128, "colsample_bytree": 0.5},
    "raw_ff0.5": {"colsample_bytree": 0.5},
    "no_pca": {"pca_dims": None},
    "pca32": {"pca_dims": 32},
    "pca64": {"pca_dims": 64},
    "leaves4": {"num_leaves": 4},
    "leaves15": {"num_leaves": 15},
    "min_data25": {"min_child_samples": 25},
    "min_hess0.1": {"min_child_weight": 0.1},
    "lambda10": {"reg_lambda": 10.0},
    "ff0.1": {"colsample_bytree": 0.1},
    "ff0.2": {"colsample_bytree": 0.2},
    "ff0.8": {"colsample_bytree": 0.8},
    "lr0.05": {"learning_rate": 0.05, "n_estimators": 800},
    "rounds1000": {"n_estimators": 1000},
    "no_pca_r1000": {"pca_dims": None, "n_estimators": 1000},
    # issue #32's description of a hand-tuned LightGBM: fewer leaves, stronger regularisation
    "hand": {"num_leaves": 4, "min_child_samples": 20, "reg_lambda": 10.0, "colsample_bytree": 0.3,
             "learning_rate": 0.05, "n_estimators": 800},
}


def world_data(world: str, root: Path, seed: int):
    store = write_world_store(root, f"{world}{seed}", world, seed=seed)
    fs = load_features(store.root)
    train, holdout = fs.rows("train"), fs.rows("holdout")
    index = {c: k for k, c in enumerate(fs.classes)}
    y = np.array([index[label] for label in fs.labels[train]])
    y_ho = np.array([index[label] for label in fs.labels[holdout]])
    return fs.matrix[train], y, fs.matrix[holdout], y_ho


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="similar,strong_weak,pooled")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/lgbm_defaults.json")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    results = {**header(), "worlds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds.split(","):
            X, y, X_ho, y_ho = world_data(world, Path(tmp), args.seed)
            t0 = time.process_time()
            logreg = kaggle_log_loss(y_ho, M.CVLogReg(n_jobs=1).fit(X, y).predict_proba(X_ho))
            row = {"shape": list(X.shape), "classes": int(y.max() + 1), "logreg": logreg,
                   "logreg_cpu_seconds": time.process_time() - t0, "lgbm": {}}
            print(f"{world}: {X.shape[0]} x {X.shape[1]}, logreg holdout {logreg:.4f}", flush=True)
            for name in args.configs.split(","):
                t0 = time.process_time()
                m = M.PCALightGBM(**CONFIGS[name]).fit(X, y)
                loss = kaggle_log_loss(y_ho, m.predict_proba(X_ho))
                row["lgbm"][name] = {"holdout_log_loss": loss, "ratio": loss / logreg, "rounds": m.rounds_,
                                     "cpu_seconds": time.process_time() - t0, "params": CONFIGS[name]}
                print(f"  {name:<12} holdout {loss:.4f}  {loss / logreg:.2f} x logreg  rounds {m.rounds_:>4}  "
                      f"{time.process_time() - t0:.1f} s cpu", flush=True)
            results["worlds"][world] = row
    write_json(results, args.out)


if __name__ == "__main__":
    main()
