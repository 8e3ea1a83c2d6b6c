"""The stackers: scikit-learn estimators over concatenated backbone features, with honest out-of-fold predictions."""
from __future__ import annotations

import warnings

import numpy as np
from joblib import Parallel, cpu_count, delayed
from scipy.optimize import minimize
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .blend import blend, blend_oof, blend_weights
from .errors import FeatstackError
from .reports import kaggle_log_loss

MODELS = ("logreg", "lgbm", "stack", "avg", "blend")
LEVEL2 = ("logreg", "lgbm")

# C = 1 is the public dog-breed kernels' setting; tol 1e-6 because sklearn's lbfgs stops after a handful of
# iterations at its default 1e-4 on 120 classes, with visibly worse log loss (BENCHMARKS.md).
LOGREG_C = 1.0
LOGREG_TOL = 1e-6
LOGREG_MAX_ITER = 300
# --C auto: a small logarithmic grid, walked from strong to weak regularisation so each fit warm-starts from the
# previous, cheaper one.
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
LGBM_PCA_DIMS = 128
# rows x dims x classes from which folds run in parallel processes (the dog-breed shape is 7e9, one vgg16 block
# 5e8; the tests' datasets stay below 1e6, where starting the workers would cost more than it saves).
PARALLEL_FOLDS_MIN_WORK = 1e8


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


def _lr(seed, C, tol, start=None):
    lr = LogisticRegression(C=C, tol=tol, max_iter=LOGREG_MAX_ITER, random_state=seed)
    if start is not None:
        lr.set_params(warm_start=True)
        lr.coef_, lr.intercept_ = start[0].copy(), start[1].copy()
    return lr


def standardise(X: np.ndarray, rows=slice(None)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``X[rows]`` standardised in X's dtype, with StandardScaler's mean and scale (population std; a constant column
    is scaled by 1), both accumulated in float64."""
    Z = X[rows].copy() if isinstance(rows, slice) else X[rows]
    mean = Z.mean(axis=0, dtype=np.float64)
    Z -= mean.astype(Z.dtype)
    scale = np.sqrt(np.square(Z).mean(axis=0, dtype=np.float64))
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0
    Z /= scale.astype(Z.dtype)
    return Z, mean, scale


class SoftmaxObjective:
    """scikit-learn's lbfgs objective for multinomial logistic regression: mean log loss + ||W||² / (2 C n), the
    intercept unpenalised. The two products with the data run in its dtype (float32 for cached features, three times
    faster than float64 here); the rest is float64."""

    def __init__(self, Z: np.ndarray, y: np.ndarray, n_classes: int, C: float):
        self.Z, self.y, self.n_classes = Z, y, n_classes
        self.rows = np.arange(len(y))
        self.l2 = 1.0 / (C * len(y))

    def split(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = self.Z.shape[1]
        return w[:d * self.n_classes].reshape(d, self.n_classes), w[d * self.n_classes:]

    def logits(self, Z: np.ndarray, w: np.ndarray) -> np.ndarray:
        """float64 logits of standardised rows ``Z``, the product in Z's dtype."""
        W, b = self.split(w)
        logits = (Z @ W.astype(Z.dtype)).astype(np.float64)
        logits += b
        return logits

    def predict_proba(self, Z: np.ndarray, w: np.ndarray) -> np.ndarray:
        return softmax(self.logits(Z, w), axis=1)

    def __call__(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        W, _ = self.split(w)
        logits = self.logits(self.Z, w)
        top = logits.max(axis=1, keepdims=True)
        logits -= top
        true_logit = logits[self.rows, self.y].sum()
        proba = np.exp(logits, out=logits)  # reuses the buffer: logits are not needed past this line
        total = proba.sum(axis=1, keepdims=True)
        n = len(self.y)
        loss = (np.log(total).sum() - true_logit) / n + 0.5 * self.l2 * np.dot(w[:W.size], w[:W.size])
        proba /= total
        proba[self.rows, self.y] -= 1
        proba /= n  # now the gradient of the mean loss with respect to the logits
        grad = np.empty_like(w)
        grad_W = grad[:W.size].reshape(W.shape)
        grad_W[:] = self.Z.T @ proba.astype(self.Z.dtype)
        grad_W += self.l2 * W
        grad[W.size:] = proba.sum(axis=0)
        return loss, grad


def _lbfgs(objective: SoftmaxObjective, w0: np.ndarray, tol: float) -> tuple[np.ndarray, bool]:
    """scipy's L-BFGS-B with the settings scikit-learn's lbfgs solver uses; also whether it hit the iteration limit."""
    result = minimize(objective, w0, jac=True, method="L-BFGS-B",
                      options={"maxiter": LOGREG_MAX_ITER, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps})
    return result.x, result.nit >= LOGREG_MAX_ITER


def _fold_path(X, y, train, valid, Cs, tol, n_classes):
    """One fold from its training rows alone: standardise, then fit every C in turn, each warm-started from the last.

    Returns, per C, the held-out probabilities and the solution in raw-feature coordinates (W, b with logits
    X @ W + b). Nothing that saw the held-out rows is used, not even as a starting point: from the refit's solution
    a fold's result moves with its held-out rows, and at tol 1e-5 it stops there at once (OOF log loss 0.0009 on
    the dog-breed shape, BENCHMARKS.md).
    """
    Z, mean, scale = standardise(X, train)
    Z_valid = ((X[valid] - mean) / scale).astype(X.dtype)
    w = np.zeros((Z.shape[1] + 1) * n_classes)
    out = []
    for C in Cs:
        # scikit-learn fits two classes with one logit: the same model as two softmax logits at half the C.
        objective = SoftmaxObjective(Z, y[train], n_classes, C / 2 if n_classes == 2 else C)
        w, stopped = _lbfgs(objective, w, tol)
        W, b = objective.split(w)
        raw_W = W / scale[:, None]
        out.append((objective.predict_proba(Z_valid, w), (raw_W, b - mean @ raw_W), stopped))
    return out


def _fold_jobs(shape: tuple[int, int], n_classes: int, folds: int) -> int:
    """Worker processes for the folds: one per core once a fold's products are large enough to repay the start.

    Each worker gets cores // workers BLAS threads (joblib's default), and the optimiser's own bookkeeping, which is
    single-threaded, overlaps with the other workers' products: CVLogReg on the dog-breed shape took 40.0 s on 2
    workers against 48.4 s one fold after another with 2 BLAS threads (BENCHMARKS.md).
    """
    rows, dims = shape
    if rows * dims * n_classes < PARALLEL_FOLDS_MIN_WORK:
        return 1
    return max(1, min(folds, cpu_count()))


def logreg_cv(X, y, *, folds: int = 5, seed: int = 0, C: float | str = LOGREG_C, tol: float = LOGREG_TOL,
              n_jobs: int | None = None) -> dict:
    """Out-of-fold probabilities of a standardised logistic regression, and the model refit on every row.

    Each fold is fit from zeros on its own rows with the float32 objective above (C="auto": it walks C_GRID,
    each C warm-started from the last within the fold), and the C with the lowest pooled OOF log loss wins. The
    refit is scikit-learn's own pipeline, warm-started from the mean of the folds' solutions at that C, as
    LogisticRegressionCV does: it saw every row, and it scores none of them.
    """
    classes, y_index = np.unique(y, return_inverse=True)
    splits = list(_folds(folds, seed).split(X, y))
    auto = C == "auto"
    Cs = C_GRID if auto else (float(C),)
    if n_jobs is None:
        n_jobs = _fold_jobs(X.shape, len(classes), folds)
    paths = Parallel(n_jobs=n_jobs)(delayed(_fold_path)(X, y_index, tr, va, Cs, tol, len(classes))
                                    for tr, va in splits)
    oofs = [np.zeros((len(y), len(classes))) for _ in Cs]
    for (_, valid), path in zip(splits, paths):
        for k, (proba, _, _) in enumerate(path):
            oofs[k][valid] = proba
    stopped = sum(fit[2] for path in paths for fit in path)
    if stopped:  # said once here, not per fold: folds may run in worker processes
        warnings.warn(f"lbfgs reached its {LOGREG_MAX_ITER}-iteration limit before tol {tol:g} in {stopped} of "
                      f"{len(paths) * len(Cs)} fold fits", ConvergenceWarning, stacklevel=2)
    grid = {c: kaggle_log_loss(y_index, o) for c, o in zip(Cs, oofs)}
    best = min(range(len(Cs)), key=lambda k: grid[Cs[k]])
    raw_W, raw_b = (np.mean([path[best][1][j] for path in paths], axis=0) for j in (0, 1))
    scaler = StandardScaler().fit(X)
    if len(classes) == 2:
        raw_W, raw_b = raw_W[:, 1:] - raw_W[:, :1], raw_b[1:] - raw_b[:1]
    start = ((raw_W * scaler.scale_[:, None]).T, raw_b + scaler.mean_ @ raw_W)
    final = make_pipeline(scaler, _lr(seed, Cs[best], tol, start).fit(scaler.transform(X), y))
    return {"oof": oofs[best], "estimator": final, "C": Cs[best], "grid": grid if auto else None}


class CVLogReg(ClassifierMixin, BaseEstimator):
    """Standardised multinomial logistic regression that also keeps its out-of-fold probabilities (``oof_``);
    ``C="auto"`` picks C from C_GRID by CV on the rows it is fit on (``C_``, ``C_grid_``)."""

    def __init__(self, C: float | str = LOGREG_C, folds: int = 5, seed: int = 0, tol: float = LOGREG_TOL,
                 n_jobs: int | None = None):
        self.C = C
        self.folds = folds
        self.seed = seed
        self.tol = tol
        self.n_jobs = n_jobs

    def fit(self, X, y):
        fit = logreg_cv(X, y, folds=self.folds, seed=self.seed, C=self.C, tol=self.tol, n_jobs=self.n_jobs)
        self.pipeline_, self.oof_, self.C_, self.C_grid_ = fit["estimator"], fit["oof"], fit["C"], fit["grid"]
        self.classes_ = self.pipeline_.classes_
        return self

    def cv_predict_proba(self, y):
        return self.oof_

    def predict_proba(self, X):
        return self.pipeline_.predict_proba(X)

    def predict(self, X):
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class PCALightGBM(ClassifierMixin, BaseEstimator):
    """LightGBM made practical on thousands of CNN dims: standardise, PCA, and early stopping on a held-out fold.

    120 classes grow 120 trees a round; on 6,656 raw dims that is tens of minutes on 2 cores. PCA to
    ``pca_dims`` keeps the leading structure of pooled CNN features and shrinks each tree's split search accordingly;
    63 histogram bins and small trees keep a round cheap; early stopping on a stratified 10% of the training
    rows picks the number of rounds. A minimum leaf hessian and L2 on leaves stop the 120-class softmax from
    diverging (leaf values explode on tiny hessians otherwise).
    """

    def __init__(self, pca_dims: int | None = LGBM_PCA_DIMS, n_estimators: int = 200, learning_rate: float = 0.2,
                 num_leaves: int = 7, early_stopping_rounds: int = 20, seed: int = 0):
        self.pca_dims = pca_dims
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.early_stopping_rounds = early_stopping_rounds
        self.seed = seed

    def fit(self, X, y):
        import lightgbm as lgb
        steps = [StandardScaler()]
        if self.pca_dims and X.shape[1] > self.pca_dims:
            steps.append(PCA(n_components=min(self.pca_dims, X.shape[0] - 1), random_state=self.seed))
        self.reduce_ = make_pipeline(*steps).fit(X)
        Z = self.reduce_.transform(X).astype(np.float32)
        self.classes_ = np.unique(y)
        tr, va = train_test_split(np.arange(len(y)), test_size=0.1, random_state=self.seed, stratify=y)
        self.booster_ = lgb.LGBMClassifier(
            n_estimators=self.n_estimators, learning_rate=self.learning_rate, num_leaves=self.num_leaves,
            min_child_samples=10, min_child_weight=1.0, reg_lambda=1.0, subsample=0.8, subsample_freq=1,
            colsample_bytree=0.5, max_bin=63, random_state=self.seed,
            n_jobs=-1, verbose=-1)
        self.booster_.fit(Z[tr], y[tr], eval_X=(Z[va],), eval_y=(y[va],),
                          callbacks=[lgb.early_stopping(self.early_stopping_rounds, verbose=False)])
        return self

    def predict_proba(self, X):
        return self.booster_.predict_proba(self.reduce_.transform(X).astype(np.float32))

    def predict(self, X):
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class _PerBackbone(ClassifierMixin, BaseEstimator):
    """Level 1 shared by stack, avg and blend: one CVLogReg per backbone on its own columns, OOF kept."""

    def _fit_level1(self, X, y):
        self.classes_ = np.unique(y)
        self.level1_ = {}
        for name, (a, b) in self.columns.items():
            self.level1_[name] = CVLogReg(C=self.C, folds=self.folds, seed=self.seed).fit(X[:, a:b], y)
        self.oof_level1_ = [m.oof_ for m in self.level1_.values()]

    def _level1_probas(self, X):
        return [m.predict_proba(X[:, a:b]) for m, (a, b) in zip(self.level1_.values(), self.columns.values())]

    def predict(self, X):
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class OOFStack(_PerBackbone):
    """Two-level stacking: per-backbone level-1 out-of-fold probabilities feed a level-2 model; level-1 models are
    refit on every training row for new data, as StackingClassifier does.

    Unlike StackingClassifier it keeps the level-1 OOF matrix (``oof_level1_``), so the stack's own CV score
    needs only level-2 refits, not a nested CV of every level-1 model.
    """

    def __init__(self, columns: dict, level2: str = "logreg", folds: int = 5, seed: int = 0, C: float | str = LOGREG_C):
        self.columns = columns
        self.level2 = level2
        self.folds = folds
        self.seed = seed
        self.C = C

    def _level2(self):
        if self.level2 == "logreg":  # keeps its own OOF, from the same folds: the stack's CV costs no second pass
            return CVLogReg(C=1.0, folds=self.folds, seed=self.seed)
        return PCALightGBM(pca_dims=None, seed=self.seed)

    def fit(self, X, y):
        self._fit_level1(X, y)
        self.level2_ = self._level2().fit(np.hstack(self.oof_level1_), y)
        return self

    def cv_predict_proba(self, y):
        """Out-of-fold probabilities of the whole stack on the training rows (level-2 CV on level-1 OOF)."""
        if isinstance(self.level2_, CVLogReg):
            return self.level2_.oof_
        return cross_val_predict(self._level2(), np.hstack(self.oof_level1_), y, cv=_folds(self.folds, self.seed),
                                 method="predict_proba")

    def predict_proba(self, X):
        return self.level2_.predict_proba(np.hstack(self._level1_probas(X)))


class Blend(_PerBackbone):
    """Per-backbone logistic regressions whose probabilities are averaged with ``weights_``: non-negative, summing
    to 1, minimising OOF log loss (``weights="optimise"``), or all equal (``"equal"``, the ``avg`` model)."""

    def __init__(self, columns: dict, weights: str = "optimise", folds: int = 5, seed: int = 0,
                 C: float | str = LOGREG_C):
        self.columns = columns
        self.weights = weights
        self.folds = folds
        self.seed = seed
        self.C = C

    def fit(self, X, y):
        self._fit_level1(X, y)
        n = len(self.columns)
        self.weights_ = blend_weights(self.oof_level1_, y) if self.weights == "optimise" else np.full(n, 1 / n)
        return self

    def cv_predict_proba(self, y):
        """The blend's own CV: weights fitted inside each fold on the other folds' OOF rows (equal ones need none)."""
        if self.weights != "optimise":
            return blend(self.oof_level1_, self.weights_)
        splits = _folds(self.folds, self.seed).split(self.oof_level1_[0], y)
        oof, self.fold_weights_ = blend_oof(self.oof_level1_, y, splits)
        return oof

    def predict_proba(self, X):
        return blend(self._level1_probas(X), self.weights_)


def build(model: str, columns: dict[str, tuple[int, int]], *, level2: str = "logreg", folds: int = 5, seed: int = 0,
          C: float | str = LOGREG_C):
    if model == "logreg":
        return CVLogReg(C=C, folds=folds, seed=seed)
    if model == "lgbm":
        return PCALightGBM(seed=seed)
    if model == "stack":
        return OOFStack(columns, level2=level2, folds=folds, seed=seed, C=C)
    if model in ("avg", "blend"):
        return Blend(columns, weights="equal" if model == "avg" else "optimise", folds=folds, seed=seed, C=C)
    raise ValueError(model)


def fit_with_oof(estimator, X, y, *, folds: int, seed: int):
    """Out-of-fold probabilities for every training row, then the estimator refit on all of them."""
    if hasattr(estimator, "cv_predict_proba"):  # keeps its own OOF: one pass of fits, no second CV
        estimator.fit(X, y)
        return estimator.cv_predict_proba(y), estimator
    oof = cross_val_predict(clone(estimator), X, y, cv=_folds(folds, seed), method="predict_proba")
    return oof, estimator.fit(X, y)


def fitted_summary(estimator) -> dict:
    """What the report shows beyond scores: the chosen C (and its grid) and the blend weights."""
    def choice(m):
        return {"C": m.C_, "grid": {f"{c:g}": ll for c, ll in m.C_grid_.items()} if m.C_grid_ else None}

    out = {}
    if isinstance(estimator, CVLogReg):
        out["C"] = {"logreg": choice(estimator)}
    if isinstance(estimator, _PerBackbone):
        out["C"] = {n: choice(m) for n, m in estimator.level1_.items()}
    if isinstance(estimator, Blend):
        out["blend_weights"] = {n: float(w) for n, w in zip(estimator.columns, estimator.weights_)}
    return out
