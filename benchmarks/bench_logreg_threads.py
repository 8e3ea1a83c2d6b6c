#!/usr/bin/env python
"""Is `logreg` bit-for-bit the scikit-learn recipe at every BLAS thread count? (issue #31 item 6)

On stores of a few shapes, the recipe ``cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(C=1,
tol=1e-6, max_iter=300)), cv=StratifiedKFold(5, shuffle=True, random_state=0))`` plus its refit runs in this process
at each of --threads BLAS threads (threadpoolctl), and featstack's CVLogReg once at its own setting; the largest
absolute differences of the OOF and of the refit's probabilities on the training rows are reported, pairwise.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, write_json  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from featstack import models as M  # noqa: E402
from featstack.features import load_features  # noqa: E402
from featstack.synthetic import write_synthetic_store  # noqa: E402

# (name, write_synthetic_store arguments): the size of tests/test_models.py::test_logreg_is_the_scikit_learn_recipe,
# the realistic worlds' size, and a larger one
SHAPES = {"test": dict(classes=4, per_class=30, separation=0.5),
          "world": dict(classes=20, per_class=100, separation=1.0, widths={"a": 64, "b": 64, "c": 64, "d": 32}),
          "large": dict(classes=30, per_class=60, separation=0.5, widths={"a": 512, "b": 512}),
          "dogbreed_wide": dict(classes=120, per_class=8, separation=0.3, widths={"a": 2048, "b": 1024}, world="hard")}


def recipe(X, y):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, tol=1e-6, max_iter=300))
    oof = cross_val_predict(pipe, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")
    return oof, pipe.fit(X, y).predict_proba(X)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--threads", default="1,2")
    p.add_argument("--out", default="benchmarks/results/logreg_threads.json")
    a = p.parse_args()
    results = {**header(), "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.shapes.split(","):
            fs = load_features(write_synthetic_store(Path(tmp) / name, name, **SHAPES[name]).root)
            train = fs.rows("train")
            X, y = fs.matrix[train], np.array([fs.classes.index(v) for v in fs.labels[train]])
            runs = {}
            for t in [int(t) for t in a.threads.split(",")]:
                with threadpool_limits(limits=t, user_api="blas"):
                    runs[f"recipe, {t} BLAS thread{'s' if t > 1 else ''}"] = recipe(X, y)
            fast = M.CVLogReg(n_jobs=1).fit(X, y)
            runs["featstack logreg"] = (fast.oof_, fast.predict_proba(X))
            keys = list(runs)
            diffs = {f"{keys[i]} vs {keys[j]}": {"oof": float(np.abs(runs[keys[i]][0] - runs[keys[j]][0]).max()),
                                                 "refit": float(np.abs(runs[keys[i]][1] - runs[keys[j]][1]).max())}
                     for i in range(len(keys)) for j in range(i + 1, len(keys))}
            results["shapes"][name] = {"rows": int(X.shape[0]), "dims": int(X.shape[1]),
                                       "classes": len(fs.classes), "featstack_blas_threads":
                                       M.blas_threads(X.shape, len(fs.classes), 1), "max_abs_diff": diffs}
            print(name, X.shape, len(fs.classes))
            for k, v in diffs.items():
                print(f"  {k}: OOF {v['oof']:.3g}, refit {v['refit']:.3g}", flush=True)
    write_json(results, a.out)


if __name__ == "__main__":
    main()
