"""The stackers: scikit-learn estimators over cached backbone features, with honest out-of-fold predictions."""
from __future__ import annotations

import math
import re
import threading
import time
import warnings
from contextlib import contextmanager

import numpy as np
from joblib import Parallel, cpu_count, delayed
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from .blend import POOL_CAPS, blend, blend_oof, blend_weights, pool, pool_cv
from .errors import FeatstackError
from .reports import kaggle_log_loss

MODELS = ("logreg", "lgbm", "stack", "avg", "blend")
# stack's level 2: "pool" (log-linear pooling of the members, the default: it nests each member, so it cannot lose to
# the best of them by more than its fitting noise), "logreg" (a full multinomial logistic regression on the
# members' log-probabilities, C from its own CV), "lgbm".
LEVEL2 = ("pool", "logreg", "lgbm")
LEVEL2_DEFAULT = "pool"

# C = 1 is the public dog-breed kernels' setting; tol 1e-6 because lbfgs stops after a handful of iterations at
# scikit-learn's default 1e-4 on 120 classes, with visibly worse log loss (BENCHMARKS.md).
LOGREG_C = 1.0
LOGREG_TOL = 1e-6
LOGREG_MAX_ITER = 300
# --C auto: a logarithmic grid (issue #19: the old grid 0.001..10 chose an edge on both measured datasets), every
# point a cold fit, as --C at that value. Warm starts from the previous C saved 5-26 % of the CPU seconds on the
# realistic worlds (3.4 s against 4.6 s at most) but scored large C up to 0.018 apart from the fit itself (issue #31).
C_GRID = tuple(10.0 ** k for k in range(-4, 3))
# Level 2 of `stack` sees classes x members columns of log-probabilities: weak regularisation there is the
# overfitting regime (C = 1 lost to a plain average, issue #19), and its fits at large C are the slow ones.
LEVEL2_C_GRID = tuple(10.0 ** k for k in range(-4, 1))
# Level-2 inputs are log-probabilities clipped here: log(1e-15) = -34.5 would dominate a standardised column.
LOG_CLIP = 1e-5
LGBM_PCA_DIMS = 128
# LightGBM sees the raw pooled features up to this width, PCA to LGBM_PCA_DIMS only beyond it (issue #32): trees split
# raw ReLU activations well and PCA's rotations badly. Holdout log loss against logreg's, PCA to 128 -> raw, on
# the three realistic worlds of benchmarks/worlds.py: similar 1.39 -> 1.04 x, strong_weak 1.27 -> 1.01 x, pooled
# (1,792 dims) 2.00 -> 1.21 x (benchmarks/bench_lgbm.py, BENCHMARKS.md). Raw costs 2-15x the CPU seconds (pooled:
# 98 s against 6.4 s a fit); the dog-breed shape's 6,656 dims stay on PCA, where a raw fit would take an hour.
LGBM_PCA_ABOVE = 2048
# A fifth of the features per tree: on raw features 0.95 / 0.90 / 1.17 x logreg against 0.5's 1.04 / 1.01 / 1.21 x,
# at about half the CPU seconds (0.1: 0.94 / 0.96 / 1.10 x; leaves, L2, minimum rows or hessian a leaf and the rate
# moved it less and not consistently: BENCHMARKS.md).
LGBM_FEATURE_FRACTION = 0.2
# LightGBM runs on one OpenMP thread, its folds in worker processes like logreg's (fit_with_oof): on a 2-core machine
# where anything else is running, OpenMP's barriers made 2 threads 6-500x slower than 1 (9,199 x 128 x 120 classes:
# 6.0 s against 3.4 s for 10 rounds; 640 x 128 x 20: 279 s against 1.4 s for 100; BENCHMARKS.md). deterministic=True
# keeps a run equal across thread counts (tests/test_models.py::test_lightgbm_repeats_exactly_across_thread_counts).
LGBM_THREADS = 1
# rows x dims x classes from which folds run in worker processes (the dog-breed shape is 7e9; the tests' datasets
# stay below 1e6, where starting the workers would cost more than it saves).
PARALLEL_FOLDS_MIN_WORK = 1e8
MEMBER_KINDS = ("backbones", "concat", "lgbm")
# Level-1 holdout and test predictions of stack / blend / avg: "refit" (members refit on every training row) or
# "folds" (the mean of their fold models, the inputs level 2 and the blend weights were fitted on); chosen by
# measurement: the fold models' mean scored the better holdout log loss on both realistic worlds (BENCHMARKS.md).
LEVEL1_PREDICT = "folds"

_say = None


@contextmanager
def progress(say=print):
    """Within the block, every stacker phase says what it is doing (fold k of n, refit, level 2) through ``say``."""
    global _say
    before, _say = _say, say
    try:
        yield
    finally:
        _say = before


def say(message: str) -> None:
    if _say is not None:
        _say(message)


def parse_C(value) -> float | str:
    """``--C``: a positive number, or ``auto`` for a choice from C_GRID by cross-validation."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        C = float(value)
    except (TypeError, ValueError):
        C = float("nan")
    if not C > 0 or not np.isfinite(C):
        raise FeatstackError(f"--C {value}: give a positive number or auto")
    return C


def _folds(folds: int, seed: int):
    return StratifiedKFold(folds, shuffle=True, random_state=seed)


def _stop_reason(caught) -> str | None:
    """How lbfgs stopped short of tol, from scikit-learn's ConvergenceWarning: scipy's status 1 is the iteration
    limit; any other status (ABNORMAL: the line search found no decrease) is the float32 noise floor."""
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            status = re.search(r"status=(\d+)", str(w.message))
            return "iteration limit" if status is None or status.group(1) == "1" else "noise floor"
    return None


def _fit_path(X, y, train, valid, Cs, tol, threads, job, sample_weight=None):
    """One job: scikit-learn's StandardScaler + LogisticRegression on rows ``train`` at each C of ``Cs`` in turn,
    each from zeros, as the plain recipe: every grid point is the fit ``--C`` at that value makes (issue #31: warm-
    started from the previous C, lbfgs stopped at tol elsewhere and C = 100 scored 0.9178 against 0.9194 cold).

    Returns ``job`` and, per C, the probabilities of rows ``valid`` (None for the refit), the fitted pipeline and how
    lbfgs stopped short of tol (None when it converged). ``threads`` BLAS threads: workers x threads <= cores.
    """
    weights = None if sample_weight is None else sample_weight[train]
    with threadpool_limits(limits=threads, user_api="blas"):
        Z = X[train]
        scaler = StandardScaler().fit(Z, sample_weight=weights)
        Z = scaler.transform(Z)
        Z_valid = None if valid is None else scaler.transform(X[valid])
        out = []
        for C in Cs:
            lr = LogisticRegression(C=C, tol=tol, max_iter=LOGREG_MAX_ITER)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                lr.fit(Z, y[train], sample_weight=weights)
            pipeline = make_pipeline(scaler, lr)
            out.append((None if Z_valid is None else lr.predict_proba(Z_valid), pipeline, _stop_reason(caught)))
    return job, out


def _large(shape: tuple[int, int], n_classes: int) -> bool:
    rows, dims = shape
    return rows * dims * n_classes >= PARALLEL_FOLDS_MIN_WORK


def fold_jobs(shape: tuple[int, int], n_classes: int, folds: int) -> int:
    """Worker processes for the folds: one per core once a fold's products are large enough to repay the start."""
    if not _large(shape, n_classes):
        return 1
    return max(1, min(folds + 1, cpu_count()))


def blas_threads(shape: tuple[int, int], n_classes: int, n_jobs: int) -> int:
    """BLAS threads per job: cores // jobs for large products, else one. An lbfgs iteration on small data is a few
    millisecond-sized products, and OpenBLAS threads meet at a barrier after each: with anything else running on a
    2-core machine, 2 threads made a 1,150 x 2,560 x 10-class fit 11-28x slower than 1 (BENCHMARKS.md)."""
    return max(1, cpu_count() // n_jobs) if _large(shape, n_classes) else 1


def logreg_cv(X, y, *, folds: int = 5, seed: int = 0, C: float | str = LOGREG_C, tol: float = LOGREG_TOL,
              n_jobs: int | None = None, grid: tuple = C_GRID, label: str = "logreg", sample_weight=None) -> dict:
    """scikit-learn's ``cross_val_predict`` recipe and its refit, scheduled as one pool of jobs.

    With a fixed C the folds and the refit are the same ``make_pipeline(StandardScaler(), LogisticRegression())``
    fits the recipe makes (equal to it: tests/test_models.py), run as folds + 1 jobs on ``n_jobs`` worker processes
    of cores // n_jobs BLAS threads each, so the refit fills the worker a 5-fold CV on 2 cores leaves idle.
    ``C="auto"``: every fold walks ``grid``; the C with the lowest pooled OOF log loss is then refit on every row.
    """
    classes, y_index = np.unique(y, return_inverse=True)
    splits = list(_folds(folds, seed).split(X, y_index))
    auto = C == "auto"
    Cs = tuple(grid) if auto else (float(C),)
    if n_jobs is None:
        n_jobs = fold_jobs(X.shape, len(classes), folds)
    threads = blas_threads(X.shape, len(classes), n_jobs)
    tasks = [(train, valid) for train, valid in splits]
    if not auto:  # the refit's C is known: it runs beside the folds
        tasks.append((np.arange(len(y)), None))
    say(f"{label}: {folds} folds{'' if auto else ' + refit'} as {len(tasks)} jobs on {n_jobs} "
        f"process{'es' if n_jobs > 1 else ''} x {threads} BLAS thread{'s' if threads > 1 else ''}"
        + (f", C grid {', '.join(f'{c:g}' for c in Cs)}" if auto else f", C = {Cs[0]:g}"))
    t0 = time.perf_counter()
    results: dict[int, list] = {}
    done = 0
    for job, out in Parallel(n_jobs=n_jobs, return_as="generator_unordered")(
            delayed(_fit_path)(X, y_index, train, valid, Cs, tol, threads, job, sample_weight)
            for job, (train, valid) in enumerate(tasks)):
        results[job] = out
        done += 1
        what = "refit on all rows" if job == folds else f"fold {job + 1} of {folds}"
        say(f"{label}: {what} done ({done} of {len(tasks)} jobs, {time.perf_counter() - t0:.1f} s)")
    oofs = [np.zeros((len(y), len(classes))) for _ in Cs]
    for job, (_, valid) in enumerate(splits):
        for k, (proba, _, _) in enumerate(results[job]):
            oofs[k][valid] = proba
    scores = {c: kaggle_log_loss(y_index, o, sample_weight) for c, o in zip(Cs, oofs)}
    best = min(range(len(Cs)), key=lambda k: scores[Cs[k]])
    if auto:
        say(f"{label}: C = {Cs[best]:g} chosen; refit on all rows")
        results[folds] = _fit_path(X, y_index, np.arange(len(y)), None, (Cs[best],), tol,
                                   blas_threads(X.shape, len(classes), 1), folds, sample_weight)[1]
        say(f"{label}: refit done ({time.perf_counter() - t0:.1f} s)")
    stops = {c: [results[job][k][2] for job in range(folds)] for k, c in enumerate(Cs)}
    final = results[folds][-1 if auto else 0]
    stops[Cs[best]] = stops[Cs[best]] + [final[2]]
    fits = [reason for reasons in stops.values() for reason in reasons]
    stopped = [r for r in fits if r]
    if stopped:  # said once here, not per fold: folds run in worker processes
        limit, floor = stopped.count("iteration limit"), stopped.count("noise floor")
        warnings.warn(f"lbfgs stopped before tol {tol:g} in {len(stopped)} of {len(fits)} fits of {label} ("
                      f"{limit} at the {LOGREG_MAX_ITER}-iteration limit, {floor} at the float32 noise floor)",
                      ConvergenceWarning, stacklevel=2)
    grid_report = None
    if auto:
        grid_report = {c: {"log_loss": scores[c], "iteration_limit": stops[c].count("iteration limit"),
                           "noise_floor": stops[c].count("noise floor")} for c in Cs}
    return {"oof": oofs[best], "estimator": final[1], "C": Cs[best], "grid": grid_report,
            "edge": auto and best in (0, len(Cs) - 1),
            "fold_estimators": [results[job][best][1] for job in range(folds)]}


class _ProbaClassifier(ClassifierMixin, BaseEstimator):
    """A classifier whose prediction is the most probable of its ``classes_`` (the labels it was fit on, whatever
    they are: the CLI's 0..K-1 indices, strings, {5, 6, 7}); the fitting happens on their indices."""

    def _encode(self, X, y, sample_weight=None, dtype=(np.float64, np.float32)):
        """scikit-learn's input checks (finite, dense, 2-d, ``n_features_in_``, a classification target), then
        ``classes_`` and the labels as indices into it. float32 stays float32: the CLI's stores are float32."""
        X, y = validate_data(self, X, y, dtype=list(dtype))
        check_classification_targets(y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 classes to classify; y has 1 class")
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X)
        return X, y_index, sample_weight

    def _check(self, X, dtype=(np.float64, np.float32)):
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=list(dtype))

    def predict(self, X):
        proba = self.predict_proba(X)  # first: before fit, its NotFittedError
        return self.classes_[np.argmax(proba, axis=1)]


def _on_classes(proba: np.ndarray, seen: np.ndarray, n_classes: int) -> np.ndarray:
    """A fold model's probabilities on the classes its rows held (indices ``seen``), spread on all ``n_classes``."""
    if len(seen) == n_classes:
        return proba
    out = np.zeros((len(proba), n_classes))
    out[:, seen] = proba
    return out


class CVLogReg(_ProbaClassifier):
    """Standardised multinomial logistic regression that also keeps its out-of-fold probabilities (``oof_``) and
    fold models (``fold_estimators_``); ``C="auto"`` picks C from ``grid`` by CV on the rows it is fit on (``C_``,
    ``C_grid_``, ``C_edge_``). ``sample_weight`` reaches the scaler, every fit and the score that chooses C."""

    def __init__(self, C: float | str = LOGREG_C, folds: int = 5, seed: int = 0, tol: float = LOGREG_TOL,
                 n_jobs: int | None = None, grid: tuple = C_GRID, label: str = "logreg"):
        self.C = C
        self.folds = folds
        self.seed = seed
        self.tol = tol
        self.n_jobs = n_jobs
        self.grid = grid
        self.label = label

    def fit(self, X, y, sample_weight=None):
        X, y_index, sample_weight = self._encode(X, y, sample_weight)
        fit = logreg_cv(X, y_index, folds=self.folds, seed=self.seed, C=self.C, tol=self.tol, n_jobs=self.n_jobs,
                        grid=self.grid, label=self.label, sample_weight=sample_weight)
        self.pipeline_, self.oof_, self.C_, self.C_grid_ = fit["estimator"], fit["oof"], fit["C"], fit["grid"]
        self.C_edge_, self.fold_estimators_ = fit["edge"], fit["fold_estimators"]
        return self

    def cv_predict_proba(self, y):
        return self.oof_

    def predict_proba(self, X):
        X = self._check(X)
        return self.pipeline_.predict_proba(X)

    def predict_proba_folds(self, X):
        """The mean of the fold models' probabilities (the alternative to the refit, measured in BENCHMARKS.md)."""
        X = self._check(X)
        return np.mean([_on_classes(m.predict_proba(X), m.classes_, len(self.classes_))
                        for m in self.fold_estimators_], axis=0)


# While LightGBM grows trees, a line at least this often (issue #32: `--model lgbm` was silent for 145 s).
LGBM_PROGRESS_SECONDS = 10.0
_clock = time.monotonic


class _RoundReporter:
    """A LightGBM callback shared by the fits running at once (the folds, in threads): every
    ``LGBM_PROGRESS_SECONDS`` of the clock, one line with each running fit's round."""

    def __init__(self, label: str):
        self.label, self.lock = label, threading.Lock()
        self.start = self.last = _clock()
        self.rounds: dict[str, tuple[int, int]] = {}

    def callback(self, name: str):
        def report(env):
            with self.lock:
                self.rounds[name] = (env.iteration + 1, env.end_iteration)
                now = _clock()
                if now - self.last >= LGBM_PROGRESS_SECONDS:
                    self.last = now
                    say(f"{self.label}: " + ", ".join(f"{n} round {i} of at most {e}"
                                                      for n, (i, e) in self.rounds.items())
                        + f" ({now - self.start:.0f} s)")
        return report

    def done(self, name: str):
        with self.lock:
            self.rounds.pop(name, None)


class PCALightGBM(_ProbaClassifier):
    """LightGBM made practical on thousands of CNN dims: standardise, PCA, early stopping, then a refit.

    120 classes grow 120 trees a round; on 6,656 raw dims that is tens of minutes on 2 cores. Above ``pca_above``
    dims, PCA to ``pca_dims`` keeps the leading structure of pooled CNN features and shrinks each tree's split
    search (at a cost in log loss: narrower inputs stay raw, LGBM_PCA_ABOVE); 63
    histogram bins and small trees keep a round cheap. Early stopping on a stratified 10 % of the training rows
    finds the number of rounds, and the booster is then refit on every training row at that count, as a Kaggle
    competitor would. The minimum leaf hessian is small: a row's hessian in a 120-class softmax is about 1/120,
    so LightGBM's default of 1e-3 (not 1) keeps leaves of a few rows possible; L2 on leaves keeps them finite.

    ``folds``: fit also keeps out-of-fold probabilities (``oof_``, ``fold_rounds_``): each fold is a whole fit of
    this estimator (its own early stopping on its own training rows, its own refit), the folds and the fit on
    every row in threads (LightGBM releases the GIL), so the progress lines come from all of them.
    """

    def __init__(self, pca_dims: int | None = LGBM_PCA_DIMS, pca_above: int = LGBM_PCA_ABOVE,
                 n_estimators: int = 400, learning_rate: float = 0.1,
                 num_leaves: int = 7, min_child_samples: int = 10, min_child_weight: float = 1e-3,
                 reg_lambda: float = 1.0, colsample_bytree: float = LGBM_FEATURE_FRACTION,
                 early_stopping_rounds: int = 20, folds: int | None = None, seed: int = 0,
                 n_jobs: int = LGBM_THREADS, label: str = "lgbm"):
        self.pca_dims = pca_dims
        self.pca_above = pca_above
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.min_child_weight = min_child_weight
        self.reg_lambda = reg_lambda
        self.colsample_bytree = colsample_bytree
        self.early_stopping_rounds = early_stopping_rounds
        self.folds = folds
        self.seed = seed
        self.n_jobs = n_jobs
        self.label = label

    def _pca(self, dims: int) -> bool:
        return bool(self.pca_dims) and dims > max(self.pca_dims, self.pca_above)

    def _booster(self, rounds: int):
        import lightgbm as lgb
        return lgb.LGBMClassifier(
            n_estimators=rounds, learning_rate=self.learning_rate, num_leaves=self.num_leaves,
            min_child_samples=self.min_child_samples, min_child_weight=self.min_child_weight,
            reg_lambda=self.reg_lambda, subsample=0.8, subsample_freq=1, colsample_bytree=self.colsample_bytree,
            max_bin=63, random_state=self.seed, n_jobs=self.n_jobs, deterministic=True, force_col_wise=True,
            verbose=-1)

    def _fit_encoded(self, X, y_index, sample_weight, reporter, name):
        """The fit proper, on labels already encoded as 0..K-1 (LightGBM's eval_X / eval_y does not encode them:
        string labels crashed and {5, 6, 7} stopped at the wrong round, issue #31)."""
        import lightgbm as lgb
        steps = [StandardScaler()]
        if self._pca(X.shape[1]):
            steps.append(PCA(n_components=min(self.pca_dims, X.shape[0] - 1), random_state=self.seed))
        self.reduce_ = make_pipeline(*steps).fit(X, standardscaler__sample_weight=sample_weight)
        Z = self.reduce_.transform(X).astype(np.float32)
        # A tenth of the rows, but at least one per class; stratified where every class can give one
        valid_rows = max(math.ceil(0.1 * len(y_index)), len(np.unique(y_index)))
        stratify = y_index if np.bincount(y_index).min() >= 2 and len(y_index) - valid_rows >= valid_rows else None
        tr, va = train_test_split(np.arange(len(y_index)), test_size=valid_rows, random_state=self.seed,
                                  stratify=stratify)
        weights = (lambda rows: None) if sample_weight is None else (lambda rows: sample_weight[rows])
        stopper = self._booster(self.n_estimators)
        stopper.fit(Z[tr], y_index[tr], sample_weight=weights(tr), eval_X=Z[va], eval_y=y_index[va],
                    eval_sample_weight=None if sample_weight is None else [weights(va)],
                    callbacks=[lgb.early_stopping(self.early_stopping_rounds, verbose=False),
                               reporter.callback(name)])
        self.rounds_ = int(stopper.best_iteration_ or self.n_estimators)
        # every training row, at the early-stopped count
        self.booster_ = self._booster(self.rounds_).fit(Z, y_index, sample_weight=sample_weight,
                                                        callbacks=[reporter.callback(name)])
        reporter.done(name)
        return self

    def fit(self, X, y, sample_weight=None):
        X, y_index, sample_weight = self._encode(X, y, sample_weight)
        n_classes = len(self.classes_)
        reporter = _RoundReporter(self.label)
        if not self.folds:
            say(f"{self.label}: standardise{', PCA' if self._pca(X.shape[1]) else ''} and early stopping on "
                f"{len(y_index)} rows")
            return self._fit_encoded(X, y_index, sample_weight, reporter, "fit")
        splits = list(_folds(self.folds, self.seed).split(X, y_index))
        tasks = [*splits, (np.arange(len(y_index)), None)]
        n_jobs = fold_jobs(X.shape, n_classes, self.folds)
        say(f"{self.label}: {self.folds} folds + the fit on every row as {len(tasks)} jobs on {n_jobs} "
            f"thread{'s' if n_jobs > 1 else ''}, each early-stopped on a tenth of its training rows")

        def job(k, train, valid):
            name = "refit" if valid is None else f"fold {k + 1}"
            model = self if valid is None else clone(self).set_params(folds=None)
            seen, y_train = np.unique(y_index[train], return_inverse=True)  # a fold may lack a class
            model._fit_encoded(X[train], y_train, None if sample_weight is None else sample_weight[train],
                               reporter, name)
            proba = None if valid is None else _on_classes(model._proba(X[valid]), seen, n_classes)
            return k, model.rounds_, proba

        t0 = time.perf_counter()
        self.oof_ = np.zeros((len(y_index), n_classes))
        self.fold_rounds_ = [0] * self.folds
        for k, rounds, proba in Parallel(n_jobs=n_jobs, prefer="threads", return_as="generator_unordered")(
                delayed(job)(k, train, valid) for k, (train, valid) in enumerate(tasks)):
            if proba is not None:
                self.oof_[splits[k][1]] = proba
                self.fold_rounds_[k] = rounds
            what = "fit on every row" if k == self.folds else f"fold {k + 1} of {self.folds}"
            say(f"{self.label}: {what} done at {rounds} rounds ({time.perf_counter() - t0:.1f} s)")
        return self

    def cv_predict_proba(self, y):
        return self.oof_

    def _proba(self, X):
        return self.booster_.predict_proba(self.reduce_.transform(X).astype(np.float32))

    def predict_proba(self, X):
        return self._proba(self._check(X))


# scikit-learn's estimator checks (sklearn.utils.estimator_checks) that cannot apply, with why; passed as
# ``expected_failed_checks=expected_failed_checks`` (tests/test_estimator_checks.py). Every other check passes.
_LOGPOOL_INPUT = ("LogPool's input is a block of members x classes columns of log-probabilities (<= 0, what "
                  "level2_inputs gives) and it refuses any other matrix; this check fits it on a generic one")
EXPECTED_FAILED_CHECKS = {
    "PCALightGBM": {
        "check_sample_weight_equivalence_on_dense_data":
            "early stopping holds out a tenth of the rows: a row repeated k times can fall on both sides of that "
            "split, the same row with weight k on one side only, so the round counts differ",
    },
    "LogPool": {check: _LOGPOOL_INPUT for check in (
        "check_fit_score_takes_y", "check_estimators_overwrite_params", "check_dont_overwrite_parameters",
        "check_estimators_fit_returns_self", "check_readonly_memmap_input", "check_n_features_in_after_fitting",
        "check_positive_only_tag_during_fit", "check_estimators_dtypes", "check_dtype_object",
        "check_pipeline_consistency", "check_estimators_nan_inf", "check_estimators_pickle",
        "check_f_contiguous_array_estimator", "check_classifier_data_not_an_array", "check_classifiers_classes",
        "check_classifiers_train", "check_supervised_y_2d", "check_methods_sample_order_invariance",
        "check_methods_subset_invariance", "check_dict_unchanged", "check_fit_idempotent",
        "check_fit_check_is_fitted", "check_n_features_in", "check_fit2d_predict1d")},
}


def expected_failed_checks(estimator) -> dict[str, str]:
    """scikit-learn's ``expected_failed_checks`` for this project's estimators: check name -> reason."""
    return EXPECTED_FAILED_CHECKS.get(type(estimator).__name__, {})


def resolve_members(spec: list[str] | None, columns: dict, model: str) -> list[str]:
    """``--members``: each backbone's own logreg (``backbones`` or a backbone's name), the concatenated-features
    logreg (``concat``) and LightGBM on the concatenation (``lgbm``). Default: every backbone, plus the concatenation
    for ``stack`` and ``blend`` (often the strongest single model); ``avg`` is the plain mean of the backbones."""
    if not spec:
        spec = ["backbones"] if model == "avg" else ["backbones", "concat"]
    out = []
    for token in spec:
        names = list(columns) if token == "backbones" else [token]
        for name in names:
            if name not in columns and name not in ("concat", "lgbm"):
                raise FeatstackError(f"--members {token}: choose from {', '.join(MEMBER_KINDS)} or a backbone "
                                     f"({', '.join(columns)})")
            if name not in out:
                out.append(name)
    return out


def _member_label(name: str, columns: dict) -> str:
    return {"concat": "concatenated features logreg", "lgbm": "concatenated features lgbm"}.get(name, name + " logreg")


class _Members(_ProbaClassifier):
    """Level 1 shared by stack, avg and blend: each member's model with its out-of-fold probabilities kept.

    ``level1_predict``: holdout and test rows from the members refit on every training row ("refit", what
    StackingClassifier does) or from the mean of their fold models ("folds"; LightGBM members always refit).
    """

    def _columns(self, name):
        return slice(None) if name in ("concat", "lgbm") else slice(*self.columns[name])

    def _member(self, name):
        if name == "lgbm":
            return PCALightGBM(folds=self.folds, seed=self.seed, label=f"{self._prefix} lgbm")
        return CVLogReg(C=self.C, folds=self.folds, seed=self.seed, label=f"{self._prefix} {name}")

    def _fit_level1(self, X, y):
        """Returns the labels as indices into ``classes_``, what the members and level 2 are fit on."""
        X, y, _ = self._encode(X, y)
        width = max(end for _, end in self.columns.values())
        if X.shape[1] != width:  # slicing a wider matrix by position would feed each member another's columns
            raise ValueError(f"X has {X.shape[1]} features, but the backbones' columns "
                             f"({', '.join(f'{n} {a}:{b}' for n, (a, b) in self.columns.items())}) span {width}")
        self.members_ = resolve_members(self.members, self.columns, self._model)
        self.level1_ = {}
        self.oof_level1_ = []
        for k, name in enumerate(self.members_):
            t0 = time.perf_counter()
            say(f"{self._prefix}: member {k + 1} of {len(self.members_)}: {_member_label(name, self.columns)}")
            oof, self.level1_[name] = fit_with_oof(self._member(name), X[:, self._columns(name)], y,
                                                   folds=self.folds, seed=self.seed)
            self.oof_level1_.append(oof)
            say(f"{self._prefix}: member {name}: CV log loss {kaggle_log_loss(y, oof):.4f} "
                f"({time.perf_counter() - t0:.1f} s)")
        return y

    def _level1_probas(self, X):
        X = self._check(X)
        out = []
        for name, m in self.level1_.items():
            Xm = X[:, self._columns(name)]
            folds = self.level1_predict == "folds" and hasattr(m, "predict_proba_folds")
            out.append(m.predict_proba_folds(Xm) if folds else m.predict_proba(Xm))
        return out


def level2_inputs(probas: list[np.ndarray]) -> np.ndarray:
    """Level 2 sees clipped log-probabilities: on that scale a linear model can sharpen or soften a member (a power
    of its probabilities), which it cannot do on probabilities, where a few confident columns dominate."""
    return np.hstack([np.log(np.clip(p, LOG_CLIP, 1.0)) for p in probas])


class LogPool(_ProbaClassifier):
    """Level 2 that nests each member: log-linear pooling ``p(c | x) ∝ exp(sum_m a_m log p_m(c | x) + b_c)`` with
    member weights ``weights_ >= 0`` fitted to minimise log loss, their sum at most a cap of ``caps`` chosen by an
    inner CV (``cap_``; ``blend.pool_cv``).

    Its inputs are ``level2_inputs`` (members' clipped log-probabilities side by side, members x classes columns).
    A full logistic regression on those columns is shrunk by L2 toward uniform probabilities, so on a few hundred
    rows it lost to the best member (issue #19); here one weight per member, and a one-hot weight is that member.
    Class biases ``bias_`` (``class_bias=True``) are off by default: on both realistic worlds they made the nested
    CV log loss worse (0.223 against 0.212, 0.310 against 0.296) and the holdout no better (BENCHMARKS.md). Like
    CVLogReg it keeps its own OOF (``oof_``): weights fitted inside each fold on the other folds' rows only.
    """

    def __init__(self, folds: int = 5, seed: int = 0, class_bias: bool = False, caps: tuple = POOL_CAPS):
        self.folds = folds
        self.seed = seed
        self.class_bias = class_bias
        self.caps = caps

    def _logp(self, X):
        """Rows x members x classes, refusing what cannot be that block: a width that is not a multiple of the
        classes, or a positive entry (log-probabilities are <= 0)."""
        if X.shape[1] % self.n_classes_:
            raise ValueError(f"LogPool takes members x classes columns of log-probabilities: {X.shape[1]} feature(s) "
                             f"are not a multiple of {self.n_classes_} classes")
        if (X > 0).any():
            raise ValueError("LogPool takes log-probabilities (<= 0, as level2_inputs gives): X has positive values")
        return X.reshape(len(X), -1, self.n_classes_)

    def fit(self, X, y):
        X, y_index, _ = self._encode(X, y, dtype=(np.float64,))
        self.n_classes_ = len(self.classes_)
        logp = self._logp(X)
        # the cap too is chosen inside each fold, on that fold's training rows only: the OOF stays nested
        self.oof_, fitted, (self.weights_, self.bias_, self.cap_) = pool_cv(
            logp, y_index, _folds(self.folds, self.seed).split(logp, y_index), self.class_bias, self.caps)
        self.fold_weights_, self.fold_caps_ = [a for a, _, _ in fitted], [c for _, _, c in fitted]
        return self

    def cv_predict_proba(self, y):
        return self.oof_

    def predict_proba(self, X):
        X = self._check(X, dtype=(np.float64,))
        return pool(self._logp(X), self.weights_, self.bias_)


class OOFStack(_Members):
    """Two-level stacking: the members' out-of-fold probabilities (as clipped log-probabilities) feed a level-2
    model: ``"pool"`` (LogPool, stack.py's default) or ``"logreg"`` (its C chosen by its own CV on that matrix,
    ``LEVEL2_C_GRID``; this class's default, as before) or ``"lgbm"``.

    Unlike StackingClassifier it keeps the level-1 OOF matrix (``oof_level1_``), so the stack's own CV score needs
    only level-2 refits, not a nested CV of every level-1 model.
    """

    _prefix, _model = "stack", "stack"

    def __init__(self, columns: dict, level2: str = "logreg", folds: int = 5, seed: int = 0,
                 C: float | str = LOGREG_C, members: list[str] | None = None, level1_predict: str = LEVEL1_PREDICT,
                 level2_C: float | str = "auto"):
        self.columns = columns
        self.level2 = level2
        self.folds = folds
        self.seed = seed
        self.C = C
        self.members = members
        self.level1_predict = level1_predict
        self.level2_C = level2_C

    def _level2(self):
        if self.level2 == "pool":
            return LogPool(folds=self.folds, seed=self.seed)
        if self.level2 == "logreg":  # keeps its own OOF, from the same folds: the stack's CV costs no second pass
            return CVLogReg(C=self.level2_C, folds=self.folds, seed=self.seed, grid=LEVEL2_C_GRID,
                            label="stack level 2")
        # half of the members x classes columns a tree, as measured before issue #32 (not re-measured there)
        return PCALightGBM(pca_dims=None, colsample_bytree=0.5, folds=self.folds, seed=self.seed,
                           label="stack level 2")

    def fit(self, X, y):
        y = self._fit_level1(X, y)
        t0 = time.perf_counter()
        say(f"stack: level 2 ({self.level2}) on {len(self.members_)} members' log-probabilities")
        self.oof_, self.level2_ = fit_with_oof(self._level2(), level2_inputs(self.oof_level1_), y, folds=self.folds,
                                               seed=self.seed)
        say(f"stack: level 2 done ({time.perf_counter() - t0:.1f} s)")
        return self

    def cv_predict_proba(self, y):
        """Out-of-fold probabilities of the whole stack on the training rows (level-2 CV on level-1 OOF)."""
        return self.oof_

    def predict_proba(self, X):
        return self.level2_.predict_proba(level2_inputs(self._level1_probas(X)))


class Blend(_Members):
    """The members' probabilities averaged with ``weights_``: non-negative, summing to 1, minimising OOF log loss
    (``weights="optimise"``), or all equal (``"equal"``, the ``avg`` model)."""

    def __init__(self, columns: dict, weights: str = "optimise", folds: int = 5, seed: int = 0,
                 C: float | str = LOGREG_C, members: list[str] | None = None, level1_predict: str = LEVEL1_PREDICT):
        self.columns = columns
        self.weights = weights
        self.folds = folds
        self.seed = seed
        self.C = C
        self.members = members
        self.level1_predict = level1_predict

    @property
    def _prefix(self):
        return "blend" if self.weights == "optimise" else "avg"

    _model = property(lambda self: self._prefix)

    def fit(self, X, y):
        y = self._fit_level1(X, y)
        n = len(self.members_)
        self.weights_ = blend_weights(self.oof_level1_, y) if self.weights == "optimise" else np.full(n, 1 / n)
        return self

    def cv_predict_proba(self, y):
        """The blend's own CV: weights fitted inside each fold on the other folds' OOF rows (equal ones need none)."""
        if self.weights != "optimise":
            return blend(self.oof_level1_, self.weights_)
        y = np.searchsorted(self.classes_, y)
        splits = _folds(self.folds, self.seed).split(self.oof_level1_[0], y)
        oof, self.fold_weights_ = blend_oof(self.oof_level1_, y, splits)
        return oof

    def predict_proba(self, X):
        return blend(self._level1_probas(X), self.weights_)


def build(model: str, columns: dict[str, tuple[int, int]], *, level2: str = LEVEL2_DEFAULT, folds: int = 5,
          seed: int = 0, C: float | str = LOGREG_C, members: list[str] | None = None,
          level1_predict: str = LEVEL1_PREDICT):
    if model == "logreg":
        return CVLogReg(C=C, folds=folds, seed=seed)
    if model == "lgbm":
        return PCALightGBM(folds=folds, seed=seed)
    if model == "stack":
        return OOFStack(columns, level2=level2, folds=folds, seed=seed, C=C, members=members,
                        level1_predict=level1_predict)
    if model in ("avg", "blend"):
        return Blend(columns, weights="equal" if model == "avg" else "optimise", folds=folds, seed=seed, C=C,
                     members=members, level1_predict=level1_predict)
    raise ValueError(model)


def fit_with_oof(estimator, X, y, *, folds: int, seed: int):
    """Out-of-fold probabilities for every training row, then the estimator refit on all of them."""
    if hasattr(estimator, "cv_predict_proba") and getattr(estimator, "folds", None) == folds:
        # keeps its own OOF, from these folds: one pass of fits, no second CV
        estimator.fit(X, y)
        return estimator.cv_predict_proba(y), estimator
    n_jobs = fold_jobs(X.shape, len(np.unique(y)), folds)
    say(f"{type(estimator).__name__}: {folds}-fold CV on {n_jobs} process{'es' if n_jobs > 1 else ''}")
    oof = cross_val_predict(clone(estimator), X, y, cv=_folds(folds, seed), method="predict_proba", n_jobs=n_jobs)
    say(f"{type(estimator).__name__}: refit on all rows")
    return oof, estimator.fit(X, y)


def fitted_summary(estimator) -> dict:
    """What the report shows beyond scores: the chosen C (and its grid), the members, level 2 and blend weights."""
    def choice(m):
        if not isinstance(m, CVLogReg):
            return {"rounds": getattr(m, "rounds_", None)}
        grid = {f"{c:g}": g for c, g in m.C_grid_.items()} if m.C_grid_ else None
        return {"C": m.C_, "grid": grid, "edge": bool(m.C_edge_)}

    out = {}
    if isinstance(estimator, CVLogReg):
        out["C"] = {"logreg": choice(estimator)}
    if isinstance(estimator, PCALightGBM):
        out["lgbm_rounds"] = estimator.rounds_
    if isinstance(estimator, _Members):
        out["members"] = list(estimator.members_)
        out["C"] = {n: choice(m) for n, m in estimator.level1_.items()}
        out["level1_predict"] = estimator.level1_predict
    if isinstance(estimator, OOFStack):
        level2 = estimator.level2_
        fitted = ({"weights": {n: float(w) for n, w in zip(estimator.members_, level2.weights_)},
                   "class_bias": level2.class_bias, "cap": level2.cap_} if isinstance(level2, LogPool)
                  else choice(level2))
        out["level2"] = {"model": estimator.level2, **fitted, "inputs": f"log-probabilities clipped at {LOG_CLIP:g}"}
    if isinstance(estimator, Blend):
        out["blend_weights"] = {n: float(w) for n, w in zip(estimator.members_, estimator.weights_)}
    return out
