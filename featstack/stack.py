"""Stacker stage: cached features -> out-of-fold CV -> refit -> one holdout score -> a complete run folder."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import time
import warnings
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning

from . import models as M
from . import reports
from .backbones import sha256_of as sha256_file
from .errors import FeatstackError
from .features import FeatureSet, exclude_training_rows, load_features
from .leftovers import dead_leftovers, lease, remove_leftover
from .paths import MODELS_DIR, RunPaths
from .split import is_disk_full


def _versions() -> dict:
    import h5py
    import lightgbm
    import sklearn
    return {"python": platform.python_version(), "numpy": np.__version__, "pandas": pd.__version__,
            "scikit-learn": sklearn.__version__, "lightgbm": lightgbm.__version__, "h5py": h5py.__version__}


def _check_trainable(fs: FeatureSet, folds: int) -> None:
    train = fs.rows("train")
    if len(train) == 0:
        raise FeatstackError(f"{fs.paths.split_csv}: no labelled training rows; a stacker needs labelled images")
    counts = pd.Series(fs.labels[train]).value_counts()
    if len(counts) < 2:
        raise FeatstackError(f"{fs.paths.split_csv}: only one class ({counts.index[0]!r}) among training rows")
    # A class with rows in split.csv but none in training (a manifest putting it only in the holdout): no model
    # can predict it, and its holdout rows could not be scored.
    missing = sorted(set(fs.labels[fs.rows("holdout")]) - set(counts.index))
    if missing:
        raise FeatstackError(f"{fs.paths.split_csv}: class {missing[0]!r} has holdout rows but no training rows"
                             f"{f' (and {len(missing) - 1} more such classes)' if len(missing) > 1 else ''}; "
                             "put some of its rows in training (split column) or drop the class")
    taken = [c for c in fs.classes if c in RESERVED_COLUMNS]
    if taken:
        raise FeatstackError(f"{fs.paths.split_csv}: a class is named {taken[0]!r}, which is a column of every "
                             "predictions file and submission (id, label); rename that class in the data (its folder "
                             "or its labels.csv value) and rerun extract_features.py")
    if counts.min() < folds:
        raise FeatstackError(f"class {counts.idxmin()!r} has {counts.min()} training rows, fewer than --folds {folds}; "
                             "lower --folds or add images of that class")


def run_stack(features: str | Path, *, backbones: list[str] | None = None, model: str = "logreg",
              level2: str = M.LEVEL2_DEFAULT, folds: int = 5, seed: int = 0, models_dir: str | Path = MODELS_DIR,
              allow_missing: bool = False, run_id: str | None = None, C: float | str = M.LOGREG_C,
              exclude: str | Path | None = None, members: list[str] | None = None,
              level1_predict: str = M.LEVEL1_PREDICT) -> Path:
    """Fit one model honestly and write its run folder; returns the folder."""
    started = time.perf_counter()
    if model not in M.MODELS:
        raise FeatstackError(f"--model {model}: choose one of {', '.join(M.MODELS)}")
    if level2 not in M.LEVEL2:
        raise FeatstackError(f"--level2 {level2}: choose one of {', '.join(M.LEVEL2)}")
    C = M.parse_C(C)
    if folds < 2:
        raise FeatstackError(f"--folds {folds}: needs at least 2")
    if run_id is not None and (run_id != Path(run_id).name or run_id.startswith(".") or "\\" in run_id):
        # "../x" wrote outside --models-dir, "a/b" and ".x" were runs that --list and the newest-run default skip
        raise FeatstackError(f"--run-id {run_id!r}: must be one folder name (no / or \\, not starting with a dot); "
                             "pass a plain name such as cd-stack-1")
    t0 = time.perf_counter()
    fs = load_features(features, backbones, allow_missing)
    load_seconds = time.perf_counter() - t0
    excluded = exclude_training_rows(fs, exclude) if exclude else None
    if excluded:
        print(f"--exclude {exclude}: {excluded['train_rows']} training rows left out"
              + (f"; {excluded['holdout_kept']} holdout rows kept (holdout rows are never excluded)"
                 if excluded["holdout_kept"] else ""))
    if fs.bad_images_note():
        print(fs.bad_images_note())
    if fs.random_weights:
        print(reports.RANDOM_WEIGHTS_NOTE)
    _check_trainable(fs, folds)
    run_id = run_id or f"{fs.paths.name}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = RunPaths(Path(models_dir) / run_id)
    if run.root.exists():
        raise FeatstackError(f"run folder {run.root} already exists; pass another run id or remove it")
    classes = fs.classes
    index = {c: k for k, c in enumerate(classes)}
    X = fs.matrix
    train, holdout, test = fs.rows("train"), fs.rows("holdout"), fs.rows("test")
    y_train = np.array([index[l] for l in fs.labels[train]])
    if members and model not in ("stack", "blend", "avg"):
        raise FeatstackError(f"--members applies to --model stack, blend or avg, not {model}")
    members = M.resolve_members(members, fs.column_ranges, model) if model in ("stack", "blend", "avg") else None
    estimator = M.build(model, fs.column_ranges, level2=level2, folds=folds, seed=seed, C=C, members=members,
                        level1_predict=level1_predict)
    print(f"{model}: {len(train)} training rows x {X.shape[1]} dims ({', '.join(fs.blocks)}), {len(classes)} classes, "
          f"{folds}-fold CV" + (f"; members {', '.join(members)}" if members else ""))
    t0 = time.perf_counter()
    # Only training rows reach the estimator: holdout labels are read once, below, for the final score.
    with warnings.catch_warnings(record=True) as caught, M.progress(print):
        warnings.simplefilter("always", ConvergenceWarning)
        oof, estimator = M.fit_with_oof(estimator, X[train], y_train, folds=folds, seed=seed)
    _say_warnings(caught)
    fit_seconds = time.perf_counter() - t0
    cv = reports.scores(y_train, oof, classes)
    t0 = time.perf_counter()
    print(f"predicting {len(holdout)} holdout and {len(test)} test rows")
    ho_proba = estimator.predict_proba(X[holdout]) if len(holdout) else np.zeros((0, len(classes)))
    test_proba = estimator.predict_proba(X[test]) if len(test) else np.zeros((0, len(classes)))
    predict_seconds = time.perf_counter() - t0
    # A test image that could not be decoded still needs its row in a submission: the training class frequencies.
    prior = np.bincount(y_train, minlength=len(classes)) / len(y_train)
    test_ids = np.concatenate([fs.ids[test], fs.unfeatured_test_ids])
    test_proba = np.vstack([test_proba, np.tile(prior, (len(fs.unfeatured_test_ids), 1))])
    holdout_report = None
    y_holdout = np.array([index[l] for l in fs.labels[holdout]], dtype=int)
    if len(holdout):
        holdout_report = reports.full_report(y_holdout, ho_proba, classes)
    seconds = time.perf_counter() - started
    report = {"run_id": run_id, "dataset": fs.paths.name, "model": model, "backbones": list(fs.blocks),
              "folds": folds, "rows": {"train": len(train), "holdout": len(holdout), "test": len(test_ids)},
              "weights": "random" if fs.random_weights else "trained",
              "bad_images": {"left_out": fs.bad_left_out, "test_class_frequencies": len(fs.unfeatured_test_ids)},
              "excluded": excluded, "cv": cv, "holdout": holdout_report, "seconds": round(seconds, 2),
              "timings": {"load": round(load_seconds, 3), "cv_and_fit": round(fit_seconds, 3),
                          "predict": round(predict_seconds, 3)},
              **M.fitted_summary(estimator)}
    cv["estimate"] = reports.cv_estimate(report)
    config = {"run_id": run_id, "dataset": fs.paths.name, "features_dir": str(fs.paths.root.resolve()),
              "dataset_meta": fs.meta, "backbones": list(fs.blocks), "feature_files": fs.entries,
              "columns": {k: list(v) for k, v in fs.column_ranges.items()}, "classes": classes, "model": model,
              "level2": level2 if model == "stack" else None, "folds": folds, "seed": seed, "C": C,
              "allow_missing": allow_missing, "exclude": excluded, "random_weights": fs.random_weights,
              "members": members, "level1_predict": level1_predict if members else None,
              "test_ids_class_frequencies": list(fs.unfeatured_test_ids), "trained_on": trained_on(fs),
              "params": {k: repr(v) for k, v in estimator.get_params(deep=False).items()},
              "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(f"writing {run.root}")
    _write_run(run, estimator, config, report, fs, classes, train, holdout, test_ids, oof, ho_proba, test_proba,
               y_holdout)
    for line in reports.summary_lines(report):
        print(line)
    print(f"CV   log loss {cv['log_loss']:.4f}  accuracy {cv['accuracy']:.4f}  ({cv['estimate']})")
    if holdout_report:
        top5 = holdout_report.get("top5_accuracy")
        print(f"holdout log loss {holdout_report['log_loss']:.4f}  accuracy {holdout_report['accuracy']:.4f}"
              + (f"  top-5 {top5:.4f}" if top5 is not None else ""))
    print(f"{seconds:.1f} s")
    print(run.root)
    return run.root


def trained_on(fs: FeatureSet) -> dict:
    """What a run was fitted and scored on: its training rows, and a sha256 of the sorted (id, label) pairs of its
    training and holdout rows (tab between id and label, one pair a line): runs on other labels differ here."""
    used = np.isin(fs.split, ["train", "holdout"])
    pairs = sorted(zip(fs.ids[used], fs.labels[used]))
    digest = hashlib.sha256("".join(f"{i}\t{l}\n" for i, l in pairs).encode()).hexdigest()
    return {"rows": int((fs.split == "train").sum()), "labels_sha256": digest}


def _say_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Fits that hit their iteration limit in one line; any other warning as Python would have shown it."""
    stopped = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    for w in caught:
        if w not in stopped:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if stopped:
        more = f" (and {len(stopped) - 1} more such warnings)" if len(stopped) > 1 else ""
        print(f"note: logistic regression stopped at its iteration limit before converging: "
              f"{str(stopped[0].message).splitlines()[0][:120]}{more}; the scores and predictions are those of the "
              "models as fitted; a smaller --C (or --C auto) converges in fewer iterations")


LEFTOVER = r"\..+\.tmp(?P<pid>\d+)"  # the hidden folder _write_run writes a run into: .<run-id>.tmp<pid>


def _write_run(run: RunPaths, estimator, config, report, fs, classes, train, holdout, test_ids, oof, ho_proba,
               test_proba, y_holdout):
    """Everything goes into a hidden folder renamed into place at the end: no half-written run folder."""
    tmp = RunPaths(run.root.parent / f".{run.run_id}.tmp{os.getpid()}")
    try:
        run.root.parent.mkdir(parents=True, exist_ok=True)
        with lease(tmp.root):  # other containers sharing the models folder see this run live, whatever its pid
            try:
                _fill_run(run, tmp, estimator, config, report, fs, classes, train, holdout, test_ids, oof, ho_proba,
                          test_proba, y_holdout)
            finally:
                shutil.rmtree(tmp.root, ignore_errors=True)
    except Exception as exc:  # a full disk may surface wrapped by joblib, pandas or matplotlib
        if not is_disk_full(exc):
            raise
        raise FeatstackError(f"{run.root.parent}: no space left on device while writing run folder "
                             f"{run.run_id}; nothing was kept: free space there (or pass another --models-dir) "
                             "and rerun") from None
    finally:
        shutil.rmtree(tmp.root, ignore_errors=True)


def _fill_run(run: RunPaths, tmp: RunPaths, estimator, config, report, fs, classes, train, holdout, test_ids, oof,
              ho_proba, test_proba, y_holdout):
    for stray in dead_leftovers(run.root.parent, LEFTOVER):  # folders of stack.py runs that were killed
        remove_leftover(stray)
    shutil.rmtree(tmp.root, ignore_errors=True)
    tmp.root.mkdir()
    joblib.dump({"estimator": estimator, "classes": classes, "backbones": list(fs.blocks)}, tmp.model_joblib)
    # What predict.py, serve.py and submit.py check before unpickling: the model file this run wrote.
    config = {**config, "model_sha256": sha256_file(tmp.model_joblib)}
    tmp.config_json.write_text(json.dumps(config, indent=2, default=str))
    reports.predictions_frame(fs.ids[train], oof, classes, fs.labels[train]).to_csv(tmp.oof_csv, index=False)
    reports.predictions_frame(fs.ids[holdout], ho_proba, classes, fs.labels[holdout]).to_csv(tmp.holdout_csv,
                                                                                              index=False)
    reports.predictions_frame(test_ids, test_proba, classes).to_csv(tmp.test_csv, index=False)
    tmp.report_json.write_text(json.dumps(report, indent=2))
    tmp.report_md.write_text(reports.markdown(report))
    if len(holdout):
        title = f"{run.run_id}: holdout" + (" (RANDOM weights)" if fs.random_weights else "")
        reports.plot_confusion(y_holdout, ho_proba, classes, tmp.confusion_png, title)
    try:
        os.rename(tmp.root, run.root)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        # Another stack.py run with the same --run-id finished first; its folder stays whole.
        raise FeatstackError(f"run folder {run.root} was written meanwhile by another stack.py run with the same "
                             "run id; this run kept nothing: pass another --run-id") from None


def read_run_json(path: Path, required: dict | None = None) -> dict:
    """A run folder's config.json or report.json, or one line naming it when it is damaged: not a JSON object, or
    lacking one of the ``required`` keys ({key: type}) as a non-empty value of that type."""
    def damaged(what: str) -> FeatstackError:
        return FeatstackError(f"{path}: damaged or unreadable ({what}); remove the run folder {path.parent} and rerun "
                              "stack.py to rebuild it")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise damaged(str(exc).splitlines()[0][:80]) from None
    if not isinstance(data, dict):
        raise damaged(f"a JSON {type(data).__name__}, not an object")
    for key, kind in (required or {}).items():
        if not isinstance(data.get(key), kind) or not data[key]:
            raise damaged(f"no {key!r} {getattr(kind, '__name__', 'value')}")
    return data


RUN_CONFIG_KEYS = {"backbones": list, "feature_files": dict, "classes": list}  # what loading a run's model needs
RESERVED_COLUMNS = ("id", "label")  # the predictions files' own columns: a class of that name would collide


def _C_mode(report: dict, config: dict) -> str:
    """``1`` for a fixed C; ``auto`` and what it chose (one C, or a range over members) for a grid."""
    if config.get("C") != "auto":
        return f"{float(config['C']):g}" if config.get("C") is not None else ""
    chosen = sorted({c["C"] for c in (report.get("C") or {}).values() if "C" in c})
    if not chosen:
        return "auto"
    return "auto:" + (f"{chosen[0]:g}" if len(chosen) == 1 else f"{chosen[0]:g}-{chosen[-1]:g}")


RUN_COLUMNS = ["id", "backbones", "model", "weights", "train_rows", "exclude", "C", "level2_C", "labels", "cv_log_loss",
               "cv_estimate", "holdout_log_loss", "holdout_accuracy", "seconds"]


def runs_table(models_dir: str | Path = MODELS_DIR, dataset: str | None = None) -> pd.DataFrame:
    """One row per run, with what decides whether two CV figures are comparable: the training rows used (and the
    labels' digest where the run folder records it), --exclude, the C mode, level 2's C, and whether the CV figure
    is nested."""
    rows = []
    for rep in sorted(Path(models_dir).glob("[!.]*/report.json")):  # hidden folders are runs being written
        r = read_run_json(rep)
        if dataset and r.get("dataset") != dataset:
            continue
        config = read_run_json(rep.parent / "config.json") if (rep.parent / "config.json").exists() else {}
        try:
            # The folder's name, not the report's run_id: a copied or renamed run is listed by what --run takes.
            rows.append({**_run_row(r, config), "id": rep.parent.name})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FeatstackError(f"{rep}: damaged ({type(exc).__name__} {str(exc)[:60]}: not a report stack.py "
                                 f"wrote); remove the run folder {rep.parent} and rerun stack.py to rebuild it, "
                                 "then --list again") from None
    # Best first by CV log loss: choosing runs by holdout score would leak the holdout into model choice.
    return pd.DataFrame(rows, columns=RUN_COLUMNS).sort_values("cv_log_loss", kind="stable")


WEIGHT_KINDS = {"imagenet": "imagenet", "random": "random", "dir": "folder", "file": "file", "preset": "preset"}


def weights_kind(r: dict, config: dict) -> str:
    """Where a run's backbones' weights came from: imagenet, random, folder (--weights FOLDER), file (a model file),
    preset (a hub preset); several joined by +."""
    kinds = []
    for attrs in (config.get("feature_files") or {}).values():
        kind = WEIGHT_KINDS.get(str(attrs.get("weights")), str(attrs.get("weights")))
        if kind not in kinds:
            kinds.append(kind)
    return "+".join(kinds) or str(r.get("weights") or "?")


def _run_row(r: dict, config: dict) -> dict:
    ho = r.get("holdout") or {}
    excluded = r.get("excluded") or {}
    trained_on = config.get("trained_on") or {}
    level2 = r.get("level2") or {}
    return {"id": str(r["run_id"]), "backbones": ",".join(r["backbones"]), "model": str(r["model"]),
            "weights": weights_kind(r, config), "train_rows": (r.get("rows") or {}).get("train"),
            "exclude": f"{Path(excluded['file']).name} ({excluded['train_rows']})" if excluded else "-",
            "C": _C_mode(r, config), "level2_C": f"{level2['C']:g}" if "C" in level2 else "-",
            "labels": str(trained_on.get("labels_sha256", ""))[:8] or "-",
            "cv_log_loss": float(r["cv"]["log_loss"]), "cv_estimate": r["cv"].get("estimate", "?").split(":")[0],
            "holdout_log_loss": float(ho.get("log_loss", np.nan)),
            "holdout_accuracy": float(ho.get("accuracy", np.nan)),
            "seconds": float(r["seconds"])}


def list_runs(models_dir: str | Path = MODELS_DIR, features: str | Path | None = None) -> pd.DataFrame:
    table = runs_table(models_dir, Path(features).name if features else None)
    if table.empty:
        print(f"no runs in {models_dir}" + (f" for {Path(features).name}" if features else ""))
    else:
        shown = table.assign(seconds=table.seconds.map(lambda v: f"{v:.1f}"))
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if table.train_rows.nunique() > 1 or table.exclude.nunique() > 1 or table.labels.nunique() > 1:
            print("note: these runs trained on different rows or labels (train_rows, exclude, labels): their CV "
                  "log losses are not comparable; compare runs with the same rows")
    return table


def newest_run(models_dir: str | Path = MODELS_DIR) -> Path:
    runs = [p.parent for p in Path(models_dir).glob("[!.]*/config.json")]
    if not runs:
        raise FeatstackError(f"no runs in {models_dir}; run stack.py first (or pass --run)")
    return max(runs, key=lambda p: str(read_run_json(p / "config.json").get("created", "")) + p.name)
