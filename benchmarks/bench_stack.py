#!/usr/bin/env python
"""Stacker benchmark, two parts.

--world dogbreed (default): seconds and scores on features of the real dog-breed shape: 10,222 labelled rows (10 %
held out) x 6,656 dims (xception 2048 + inception_v3 2048 + resnet50 2048 + vgg16 512), 120 classes, plus 10,357 test
rows, from featstack.synthetic's old ("hard") generator. The model ``recipe`` is the scikit-learn recipe of issue #23
on the same features (load, ``cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(C=1, tol=1e-6,
max_iter=300)), cv=StratifiedKFold(5, shuffle=True, random_state=0), n_jobs=2)``, one refit, holdout and test
probabilities), measured interleaved with ``stack.py --model logreg`` end to end (--repeats).

--world similar,strong_weak: every model's CV and holdout scores and seconds on the realistic worlds, by default
from benchmarks/worlds.py (a generator independent of featstack's, for issue #19's acceptance checks; --generator
synthetic uses featstack.synthetic.world_latents): each backbone's own logreg, the concatenated logreg, lgbm, avg,
blend, stack (pool level 2) and stack with the logreg level 2; for avg / blend / stack also the holdout from members
refit on every training row (the runs use the mean of their fold models) and, for the pool, with class biases; and
the issue #19 checks (stack and blend <= 1.02 x best member + 0.005; lgbm <= 1.5 x logreg).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import joblib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, write_json  # noqa: E402
from worlds import write_world_store  # noqa: E402

from featstack.features import load_features  # noqa: E402
from featstack.reports import kaggle_log_loss  # noqa: E402
from featstack.stack import run_stack  # noqa: E402
from featstack.synthetic import write_synthetic_store  # noqa: E402

WIDTHS = {"xception": 2048, "inception_v3": 2048, "resnet50": 2048, "vgg16": 512}
LIMITS = {"load": 2, "logreg": 20, "lgbm": 180, "stack": 180}


def recipe(root: Path) -> dict:
    """What a user would write instead of `stack.py --model logreg` (issue #23), end to end on the same store."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    fs = load_features(root)
    train, holdout, test = fs.rows("train"), fs.rows("holdout"), fs.rows("test")
    X, index = fs.matrix, {c: k for k, c in enumerate(fs.classes)}
    y = np.array([index[label] for label in fs.labels[train]])
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=1, tol=1e-6, max_iter=300))
    t0 = time.perf_counter()
    oof = cross_val_predict(pipe, X[train], y, cv=StratifiedKFold(5, shuffle=True, random_state=0), n_jobs=2,
                            method="predict_proba")
    cv_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe.fit(X[train], y)
    refit_seconds = time.perf_counter() - t0
    y_ho = np.array([index[label] for label in fs.labels[holdout]])
    ho = pipe.predict_proba(X[holdout])
    pipe.predict_proba(X[test])
    return {"cv_log_loss": kaggle_log_loss(y, oof), "holdout_log_loss": kaggle_log_loss(y_ho, ho),
            "cv_seconds": cv_seconds, "refit_seconds": refit_seconds}


def scores_of(run: Path) -> dict:
    rep = json.loads((run / "report.json").read_text())
    return {"cv_log_loss": rep["cv"]["log_loss"], "cv_estimate": rep["cv"].get("estimate"),
            "holdout_log_loss": rep["holdout"]["log_loss"], "holdout_accuracy": rep["holdout"]["accuracy"],
            "timings": rep.get("timings"),
            **{k: rep[k] for k in ("C", "blend_weights", "level2", "members", "lgbm_rounds") if k in rep}}


def other_holdouts(run: Path, store: Path) -> dict:
    """Holdout log losses a stack / blend / avg run's fitted model gives another way, without refitting level 1:
    level-1 predictions from the members refit on every training row (the run used the mean of their fold models),
    and, for a pool level 2, class biases added to it (refit on the same level-1 OOF, with its own nested CV)."""
    from featstack import models as M
    est = joblib.load(run / "model.joblib")["estimator"]
    fs = load_features(store)
    holdout, train = fs.rows("holdout"), fs.rows("train")
    index = {c: k for k, c in enumerate(fs.classes)}
    y_ho = np.array([index[label] for label in fs.labels[holdout]])
    est.level1_predict = "refit"
    out = {"holdout_log_loss_members_refit": kaggle_log_loss(y_ho, est.predict_proba(fs.matrix[holdout]))}
    est.level1_predict = "folds"
    if isinstance(getattr(est, "level2_", None), M.LogPool):
        y = np.array([index[label] for label in fs.labels[train]])
        biased = M.LogPool(folds=est.folds, seed=est.seed, class_bias=True)
        t0 = time.perf_counter()
        biased.fit(M.level2_inputs(est.oof_level1_), y)
        out["class_bias"] = {"cv_log_loss": kaggle_log_loss(y, biased.oof_),
                             "holdout_log_loss": kaggle_log_loss(
                                 y_ho, biased.predict_proba(M.level2_inputs(est._level1_probas(fs.matrix[holdout])))),
                             "level2_seconds": time.perf_counter() - t0, "weights": biased.weights_.tolist()}
    return out


def tree_cpu() -> dict:
    """CPU seconds of this process and its live children (the reusable joblib workers both logreg and the recipe
    use): on a shared machine the wall clock waits for other people's processes, CPU seconds do not."""
    import psutil
    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def timed_run(results: dict, key: str, fn, *args, **kwargs):
    t0, c0, tree0 = time.perf_counter(), time.process_time(), tree_cpu()
    out = fn(*args, **kwargs)
    results["seconds"][key] = time.perf_counter() - t0
    results["cpu_seconds"][key] = time.process_time() - c0
    # per process, so a worker that exits meanwhile takes only its own seconds with it (an undercount, never negative)
    results.setdefault("tree_cpu_seconds", {})[key] = sum(c - tree0.get(p, 0.0) for p, c in tree_cpu().items())
    results["load_average"][key] = os.getloadavg()[0]
    return out


def dogbreed(a, results, tmp):
    t0 = time.perf_counter()
    store = write_synthetic_store(Path(tmp) / "features", "dogbreed_shape", classes=a.classes, labelled=a.labelled,
                                  test_rows=a.test_rows, widths=WIDTHS, separation=a.separation, holdout=0.1)
    print(f"synthetic store written in {time.perf_counter() - t0:.1f} s", flush=True)
    fs = timed_run(results, "load", load_features, store.root)
    results["shape"] = {"rows": len(fs.ids), "train": len(fs.rows("train")), "dims": fs.matrix.shape[1],
                        "classes": len(fs.classes)}
    del fs
    for rep in range(a.repeats):
        for model in a.models.split(","):
            key = model if a.repeats == 1 else f"{model}#{rep + 1}"
            if model == "recipe":
                results["scores"][key] = timed_run(results, key, recipe, store.root)
            else:
                run = timed_run(results, key, run_stack, store.root, model=model, C=a.C,
                                models_dir=Path(tmp) / "models", run_id=f"{model}-{rep}")
                results["scores"][key] = scores_of(run)
            print(f"== {key}: {results['seconds'][key]:.1f} s, load {results['load_average'][key]:.1f}, "
                  f"CV {results['scores'][key]['cv_log_loss']:.4f}", flush=True)


def world_store(a, tmp: str, world: str):
    widths = {"xception": a.width, "inception_v3": a.width, "resnet50": a.width, "vgg16": a.width // 2}
    if a.generator == "independent":
        return write_world_store(Path(tmp) / "features", world, world, classes=a.classes, labelled=a.labelled,
                                 test_rows=a.test_rows, widths=widths, holdout=a.holdout, seed=a.seed), widths
    return write_synthetic_store(Path(tmp) / "features", world, classes=a.classes, labelled=a.labelled,
                                 test_rows=a.test_rows, widths=widths, separation=a.separation, holdout=a.holdout,
                                 world=world, seed=a.seed), widths


def worlds(a, results, tmp):
    for world in a.world.split(","):
        store, widths = world_store(a, tmp, world)
        runs = [(f"{b} logreg", dict(model="logreg", backbones=[b])) for b in widths]
        runs += [("concat logreg", dict(model="logreg")), ("lgbm", dict(model="lgbm")), ("avg", dict(model="avg")),
                 ("blend", dict(model="blend")), ("stack", dict(model="stack")),
                 ("stack, level 2 logreg", dict(model="stack", level2="logreg"))]
        for name, kwargs in runs:
            if a.runs and name not in a.runs.split(","):
                continue
            key = f"{world}: {name}"
            run = timed_run(results, key, run_stack, store.root, C=a.C, models_dir=Path(tmp) / "models",
                            run_id=f"{world}-{name.replace(' ', '-').replace(',', '')}", **kwargs)
            results["scores"][key] = scores_of(run)
            if kwargs["model"] in ("avg", "blend", "stack"):
                results["scores"][key].update(other_holdouts(run, store.root))
            print(f"== {key}: {results['seconds'][key]:.1f} s, CV {results['scores'][key]['cv_log_loss']:.4f}, "
                  f"holdout {results['scores'][key]['holdout_log_loss']:.4f}", flush=True)
        if a.runs:  # a part of the table: the checks need every run
            continue
        s = {k.split(": ", 1)[1]: v["holdout_log_loss"] for k, v in results["scores"].items() if k.startswith(world)}
        best = min(s[m] for m in s if m.endswith(" logreg") and not m.startswith("stack") or m == "avg")
        results.setdefault("checks", {})[world] = {
            "best_member_holdout": best, "limit": 1.02 * best + 0.005,
            "stack_ok": s["stack"] <= 1.02 * best + 0.005, "blend_ok": s["blend"] <= 1.02 * best + 0.005,
            "lgbm_over_logreg": s["lgbm"] / s["concat logreg"], "lgbm_ok": s["lgbm"] <= 1.5 * s["concat logreg"]}


def markdown_table(results) -> list[str]:
    """Every model's CV (and whether it is nested), holdout and seconds, one column group per world."""
    worlds_ = list(dict.fromkeys(k.split(": ", 1)[0] for k in results["scores"]))
    models = list(dict.fromkeys(k.split(": ", 1)[1] for k in results["scores"]))
    lines = ["| model | CV estimate | " + " | ".join(f"{w}: CV | {w}: holdout | {w}: s" for w in worlds_) + " |",
             "|---|---|" + "---|---|---|" * len(worlds_)]
    for m in models:
        cells = []
        kind = ""
        for w in worlds_:
            sc, sec = results["scores"].get(f"{w}: {m}"), results["seconds"].get(f"{w}: {m}")
            if sc is None:
                cells += ["", "", ""]
                continue
            kind = (sc.get("cv_estimate") or "").split(":")[0]
            cells += [f"{sc['cv_log_loss']:.4f}", f"{sc['holdout_log_loss']:.4f}", f"{sec:.1f}"]
        lines.append(f"| {m} | {kind} | " + " | ".join(cells) + " |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="dogbreed", help="dogbreed, or a comma list of similar, strong_weak")
    p.add_argument("--generator", default="independent", choices=("independent", "synthetic"),
                   help="realistic worlds: benchmarks/worlds.py (independent of featstack, issue #19's acceptance "
                        "checks) or featstack.synthetic's world_latents")
    p.add_argument("--labelled", type=int, default=None, help="default 10222 (dogbreed) or 2000 (realistic worlds)")
    p.add_argument("--holdout", type=float, default=0.25, help="realistic worlds: holdout fraction (default 0.25)")
    p.add_argument("--cores", type=int, default=None,
                   help="run the models as on this many cores (BLAS threads, worker processes; LightGBM is on one "
                        "thread); default: every core. On a shared machine 1 keeps BLAS threads from waiting on each "
                        "other")
    p.add_argument("--test-rows", type=int, default=None)
    p.add_argument("--classes", type=int, default=None, help="default 120 (dogbreed) or 20")
    p.add_argument("--width", type=int, default=64, help="realistic worlds: three backbones this wide, one half")
    p.add_argument("--models", default="recipe,logreg", help="dogbreed: models, run in turn (recipe = the scikit-"
                   "learn recipe of issue #23)")
    p.add_argument("--repeats", type=int, default=1, help="dogbreed: rounds of --models, interleaved")
    p.add_argument("--separation", type=float, default=None, help="class-mean scale (0.3 dogbreed, 1.0 worlds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default=None, help="realistic worlds: only these runs (e.g. stack,blend)")
    p.add_argument("--C", default="1.0", help="stack.py's --C (a number or auto)")
    p.add_argument("--out", default="benchmarks/results/stack.json")
    a = p.parse_args()
    shape = a.world == "dogbreed"
    a.labelled = a.labelled or (10222 if shape else 2000)
    a.test_rows = a.test_rows if a.test_rows is not None else (10357 if shape else 200)
    a.classes = a.classes or (120 if shape else 20)
    if a.cores:
        from featstack import models as M
        M.cpu_count = lambda: a.cores
    a.separation = a.separation if a.separation is not None else (0.3 if shape else 1.0)
    # CPU seconds and the load average beside the wall clock: on a shared machine they say how much of the wall
    # clock was waiting for other people's processes.
    results = {**header(), "C": a.C, "cores": a.cores, "load_average_start": os.getloadavg(), "shape": {},
               "seconds": {}, "cpu_seconds": {}, "load_average": {}, "scores": {}}
    with tempfile.TemporaryDirectory() as tmp:
        (dogbreed if shape else worlds)(a, results, tmp)
    print(f"\nshape: {results['shape']}")
    print(f"{'stage':<34}{'seconds':>9}{'cpu s':>8}{'tree cpu':>9}{'load':>6}  CV log loss  holdout")
    for k, v in results["seconds"].items():
        sc = results["scores"].get(k, {})
        print(f"{k:<34}{v:>9.1f}{results['cpu_seconds'].get(k, float('nan')):>8.1f}"
              f"{results['tree_cpu_seconds'].get(k, float('nan')):>9.1f}"
              f"{results['load_average'].get(k, float('nan')):>6.1f}  {sc.get('cv_log_loss', float('nan')):.4f}"
              f"       {sc.get('holdout_log_loss', float('nan')):.4f}")
    for world, check in results.get("checks", {}).items():
        print(world, check)
    if not shape:
        results["markdown"] = markdown_table(results)
        print("\n".join(results["markdown"]))
    write_json(results, a.out)


if __name__ == "__main__":
    main()
