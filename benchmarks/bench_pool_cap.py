#!/usr/bin/env python
"""The pool's cap, and what the docs say about stack (issue #31 items 5 and 6), on benchmarks/worlds.py's worlds.

Per world, seed and member C: the members (each backbone's logreg and the concatenated logreg, 5 folds) are fitted
once, as `stack` fits them; then, on the same level-1 out-of-fold and holdout probabilities:

- the log-linear pool at each fixed cap of --caps (nested CV: weights fitted on the other folds; holdout: weights
  refit on every training row), the weights' sum, and the pool with its cap chosen inside the CV (blend.POOL_CAPS);
- `blend` (simplex weights, nested CV), the concatenated `logreg` refit on every training row (what `--model
  logreg` predicts) and the mean of its five fold models (`bagged`), and `stack` (the pool at its default);
- paired bootstrap 95 % intervals over holdout rows of the holdout log-loss differences stack - blend and
  stack - bagged logreg (--boot resamples);
- with --full-nesting, the stack's CV with every member refit inside each outer fold as well (how optimistic the
  level-2-only nesting of the reported figure is).

Small C (e.g. --Cs 1,0.01,0.001) gives under-confident members: their probabilities are too soft, and the pool
sharpens them with weights summing well above 1.
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
from worlds import write_world_store  # noqa: E402

from featstack import blend as B  # noqa: E402
from featstack import models as M  # noqa: E402
from featstack.features import load_features  # noqa: E402
from featstack.reports import kaggle_log_loss  # noqa: E402


def row_losses(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Each row's term of reports.kaggle_log_loss (their mean is it)."""
    p = proba / proba.sum(axis=1, keepdims=True)
    return -np.log(np.clip(p[np.arange(len(y)), y], B.EPS, 1 - B.EPS))


def paired_interval(a: np.ndarray, b: np.ndarray, boot: int, seed: int = 0) -> dict:
    """Mean of a - b over holdout rows and its paired bootstrap 95 % interval (rows resampled, both models alike)."""
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(boot)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"diff": float(d.mean()), "ci95": [float(lo), float(hi)], "within_noise": bool(lo <= 0 <= hi)}


def one_world(a, fs, world: str, seed: int, C: float) -> dict:
    index = {c: k for k, c in enumerate(fs.classes)}
    train, holdout = fs.rows("train"), fs.rows("holdout")
    X, X_ho = fs.matrix[train], fs.matrix[holdout]
    y = np.array([index[v] for v in fs.labels[train]])
    y_ho = np.array([index[v] for v in fs.labels[holdout]])
    t0 = time.perf_counter()
    st = M.OOFStack(fs.column_ranges, level2="pool", C=C).fit(X, y)
    stack_seconds = time.perf_counter() - t0
    level1_ho = st._level1_probas(X_ho)
    L, L_ho = M.level2_inputs(st.oof_level1_), M.level2_inputs(level1_ho)
    n_classes = len(fs.classes)
    logp, logp_ho = L.reshape(len(L), -1, n_classes), L_ho.reshape(len(L_ho), -1, n_classes)
    splits = list(M._folds(st.folds, st.seed).split(logp, y))
    out = {"world": world, "seed": seed, "C": C, "stack_seconds": stack_seconds, "members": st.members_,
           "member_cv": {n: kaggle_log_loss(y, o) for n, o in zip(st.members_, st.oof_level1_)},
           "member_holdout": {n: kaggle_log_loss(y_ho, p) for n, p in zip(st.members_, level1_ho)}, "caps": {}}
    for cap in a.caps:
        oof, _ = B.fold_wise(lambda rows, cap=cap: B.pool_weights(logp[rows], y[rows], max_sum=cap),
                             lambda rows, ab: B.pool(logp[rows], *ab), (len(y), n_classes), splits)
        w, b = B.pool_weights(logp, y, max_sum=cap)
        out["caps"][f"{cap:g}"] = {"cv": kaggle_log_loss(y, oof),
                                   "holdout": kaggle_log_loss(y_ho, B.pool(logp_ho, w, b)),
                                   "weight_sum": float(w.sum())}
    # the stack as built (its level 2 at the current default)
    stack_ho = st.predict_proba(X_ho)
    out["stack"] = {"cv": kaggle_log_loss(y, st.oof_), "holdout": kaggle_log_loss(y_ho, stack_ho),
                    "weight_sum": float(st.level2_.weights_.sum()),
                    "cap": st.level2_.cap_, "fold_caps": st.level2_.fold_caps_}
    bw = B.blend_weights(st.oof_level1_, y)
    blend_oof, _ = B.blend_oof(st.oof_level1_, y, splits)
    blend_ho = B.blend(level1_ho, bw)
    out["blend"] = {"cv": kaggle_log_loss(y, blend_oof), "holdout": kaggle_log_loss(y_ho, blend_ho)}
    concat = st.level1_["concat"]
    refit_ho, bagged_ho = concat.predict_proba(X_ho), concat.predict_proba_folds(X_ho)
    out["logreg"] = {"cv": kaggle_log_loss(y, concat.oof_), "holdout_refit": kaggle_log_loss(y_ho, refit_ho),
                     "holdout_bagged": kaggle_log_loss(y_ho, bagged_ho)}
    if a.full_nesting:
        # the stack's CV figure refits level 2 per fold on level-1 OOF whose other rows came from member fold models
        # that saw the scored fold; here every member too is refit (with its own 5-fold OOF) on the other folds only
        nested = np.zeros_like(st.oof_)
        t0 = time.perf_counter()
        for train, valid in splits:
            inner = M.OOFStack(fs.column_ranges, level2="pool", C=C, folds=st.folds, seed=st.seed)
            nested[valid] = inner.fit(X[train], y[train]).predict_proba(X[valid])
        out["stack"]["cv_fully_nested"] = kaggle_log_loss(y, nested)
        out["stack"]["fully_nested_seconds"] = time.perf_counter() - t0
    r_stack = row_losses(y_ho, stack_ho)
    out["paired"] = {"stack - blend": paired_interval(r_stack, row_losses(y_ho, blend_ho), a.boot),
                     "stack - logreg bagged": paired_interval(r_stack, row_losses(y_ho, bagged_ho), a.boot),
                     "logreg bagged - logreg refit": paired_interval(row_losses(y_ho, bagged_ho),
                                                                     row_losses(y_ho, refit_ho), a.boot)}
    return out


def summary(results: dict) -> list[str]:
    """Per world and member C, over seeds: each figure's mean, the cap the stack chose, and for each paired
    difference the seeds whose row-bootstrap interval holds 0 and a t interval of the per-seed differences."""
    from scipy import stats
    lines = []
    groups = {}
    for r in results["runs"]:
        groups.setdefault((r["world"], r["C"]), []).append(r)
    for (world, C), runs in groups.items():
        mean = lambda f, runs=runs: float(np.mean([f(r) for r in runs]))  # noqa: E731
        caps = sorted(r["stack"]["cap"] for r in runs)
        sums = [round(r["stack"]["weight_sum"], 2) for r in runs]
        lines.append(f"{world}, C = {C:g}, {len(runs)} seeds (means): best member holdout "
                     f"{mean(lambda r: min(r['member_holdout'].values())):.4f}; stack CV "
                     f"{mean(lambda r: r['stack']['cv']):.4f} holdout {mean(lambda r: r['stack']['holdout']):.4f} "
                     f"(caps chosen {caps}, sums {sums}); pool at cap 3: holdout "
                     f"{mean(lambda r: r['caps'].get('3', {}).get('holdout', np.nan)):.4f}; "
                     f"blend {mean(lambda r: r['blend']['holdout']):.4f}; logreg refit "
                     f"{mean(lambda r: r['logreg']['holdout_refit']):.4f}, bagged "
                     f"{mean(lambda r: r['logreg']['holdout_bagged']):.4f}")
        for k in runs[0]["paired"]:
            d = np.array([r["paired"][k]["diff"] for r in runs])
            noise = sum(r["paired"][k]["within_noise"] for r in runs)
            half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.nan
            lines.append(f"   {k}: mean {d.mean():+.4f}, 95 % over seeds [{d.mean() - half:+.4f}, "
                         f"{d.mean() + half:+.4f}]; row-bootstrap interval holds 0 on {noise} of {len(runs)} seeds")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="similar,strong_weak")
    p.add_argument("--seeds", default="0")
    p.add_argument("--Cs", default="1,0.01", help="the members' C: 1 (the default) and small C (under-confident)")
    p.add_argument("--caps", default="1,2,3,5,10,30,100")
    p.add_argument("--labelled", type=int, default=2000)
    p.add_argument("--holdout", type=float, default=0.25)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--boot", type=int, default=2000)
    p.add_argument("--full-nesting", action="store_true",
                   help="also the stack's CV with level 1 refit inside every outer fold (5 more stacks)")
    p.add_argument("--out", default="benchmarks/results/pool_cap.json")
    p.add_argument("--summarise", default=None, help="only print the summary of this earlier --out")
    a = p.parse_args()
    if a.summarise:
        import json
        print("\n".join(summary(json.loads(Path(a.summarise).read_text()))))
        return
    a.caps = [float(c) for c in a.caps.split(",")]
    M.cpu_count = lambda: 1  # one BLAS thread, folds in this process: a shared machine's threads wait on each other
    results = {**header(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in a.seeds.split(",")]:
            for world in a.worlds.split(","):
                widths = {"xception": a.width, "inception_v3": a.width, "resnet50": a.width, "vgg16": a.width // 2}
                store = write_world_store(Path(tmp) / f"f{seed}", world, world, classes=a.classes,
                                          labelled=a.labelled, test_rows=200, widths=widths, holdout=a.holdout,
                                          seed=seed)
                fs = load_features(store.root)
                for C in [float(c) for c in a.Cs.split(",")]:
                    r = one_world(a, fs, world, seed, C)
                    results["runs"].append(r)
                    caps = "  ".join(f"{k}: {v['cv']:.4f}/{v['holdout']:.4f} (sum {v['weight_sum']:.2f})"
                                     for k, v in r["caps"].items())
                    print(f"== {world} seed {seed} C {C:g} ({r['stack_seconds']:.1f} s): best member holdout "
                          f"{min(r['member_holdout'].values()):.4f}; stack {r['stack']['cv']:.4f}/"
                          f"{r['stack']['holdout']:.4f}"
                          + (f", fully nested CV {r['stack']['cv_fully_nested']:.4f}" if a.full_nesting else "")
                          + f" (sum {r['stack']['weight_sum']:.2f}, cap "
                          f"{r['stack']['cap']}); blend {r['blend']['cv']:.4f}/{r['blend']['holdout']:.4f}; "
                          f"logreg refit {r['logreg']['holdout_refit']:.4f}, bagged "
                          f"{r['logreg']['holdout_bagged']:.4f}\n   caps (cv/holdout): {caps}\n   "
                          + "; ".join(f"{k}: {v['diff']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]"
                                      for k, v in r["paired"].items()), flush=True)
    results["summary"] = summary(results)
    print("\n".join(results["summary"]))
    write_json(results, a.out)


if __name__ == "__main__":
    main()
