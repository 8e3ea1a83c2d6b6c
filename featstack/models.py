"""The stackers: scikit-learn estimators over concatenated backbone features, with honest out-of-fold predictions."""
from __future__ import annotations

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.decomposition import PCA
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


def logreg(seed: int = 0, C: float = LOGREG_C, tol: float = LOGREG_TOL):
    return make_pipeline(StandardScaler(), _lr(seed, C, tol))


def _folds(folds: int, seed: int):
    return StratifiedKFold(folds, shuffle=True, random_state=seed)


def _lr(seed, C, tol, start=None):
    lr = LogisticRegression(C=C, tol=tol, max_iter=LOGREG_MAX_ITER, random_state=seed)
    if start is not None:
        lr.set_params(warm_start=True)
        lr.coef_, lr.intercept_ = start[0].copy(), start[1].copy()
    return lr


def _fold_path(X, y, train, valid, Cs, seed, tol, start):
    """One fold: standardise on its training rows, then fit every C in turn, each warm-started from the last."""
    scaler = StandardScaler().fit(X[train])
    Z, Zv = scaler.transform(X[train]), scaler.transform(X[valid])
    out = []
    for C in Cs:
        lr = _lr(seed, C, tol, start).fit(Z, y[train])
        start = (lr.coef_, lr.intercept_)
        out.append((lr.predict_proba(Zv), start))
    return out


def logreg_cv(X, y, *, folds: int = 5, seed: int = 0, C: float | str = LOGREG_C, tol: float = LOGREG_TOL,
              n_jobs: int | None = None) -> dict:
    """Out-of-fold probabilities of a standardised logistic regression, and the model refit on every row.

    Fixed C: the refit comes first and every fold starts from its solution. The fold objective is strictly convex
    and each fold still runs to the full tolerance, so the start only saves iterations (2-3x fewer); the OOF
    log loss matches cold-started folds (BENCHMARKS.md). ``C="auto"``: every fold walks C_GRID (warm starts stay
    inside the fold), the C with the lowest pooled OOF log loss wins, and the refit starts from the mean of
    the folds' solutions at that C, as LogisticRegressionCV does.
    """
    splits = list(_folds(folds, seed).split(X, y))
    auto = C == "auto"
    Cs = C_GRID if auto else (float(C),)
    final, start = None, None
    if not auto:
        final = logreg(seed, Cs[0], tol).fit(X, y)
        start = (final[-1].coef_, final[-1].intercept_)
    paths = Parallel(n_jobs=n_jobs)(delayed(_fold_path)(X, y, tr, va, Cs, seed, tol, start) for tr, va in splits)
    oofs = [np.zeros((len(y), len(np.unique(y)))) for _ in Cs]
    for (_, valid), path in zip(splits, paths):
        for k, (proba, _) in enumerate(path):
            oofs[k][valid] = proba
    grid = {c: kaggle_log_loss(y, o) for c, o in zip(Cs, oofs)}
    best = min(range(len(Cs)), key=lambda k: grid[Cs[k]])
    if auto:
        mean_start = tuple(np.mean([path[best][1][j] for path in paths], axis=0) for j in (0, 1))
        final = make_pipeline(StandardScaler(), _lr(seed, Cs[best], tol, mean_start)).fit(X, y)
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
        return logreg(self.seed, C=1.0) if self.level2 == "logreg" else PCALightGBM(pca_dims=None, seed=self.seed)

    def fit(self, X, y):
        self._fit_level1(X, y)
        self.level2_ = self._level2().fit(np.hstack(self.oof_level1_), y)
        return self

    def cv_predict_proba(self, y):
        """Out-of-fold probabilities of the whole stack on the training rows (level-2 CV on level-1 OOF)."""
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
