"""The stackers: scikit-learn estimators over concatenated backbone features, with honest out-of-fold predictions."""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.compose import ColumnTransformer
from sklearn.decomposition import PCA
from sklearn.ensemble import VotingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

MODELS = ("logreg", "lgbm", "stack", "avg")
LEVEL2 = ("logreg", "lgbm")

# C = 1 is the public dog-breed kernels' setting; tol 1e-6 because sklearn's lbfgs stops after a handful of
# iterations at its default 1e-4 on 120 classes, with visibly worse log loss (BENCHMARKS.md).
LOGREG_C = 1.0
LOGREG_TOL = 1e-6
LOGREG_MAX_ITER = 300
LEVEL1_TOL = 1e-4
LGBM_PCA_DIMS = 128


def logreg(seed: int = 0, C: float = LOGREG_C, tol: float = LOGREG_TOL):
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, tol=tol, max_iter=LOGREG_MAX_ITER, random_state=seed))


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


def per_backbone(columns: dict[str, tuple[int, int]], seed: int, C: float = LOGREG_C, tol: float = LOGREG_TOL):
    """One standardised logistic regression per backbone, each reading only its own columns."""
    return [(name, make_pipeline(ColumnTransformer([(name, "passthrough", slice(a, b))]), logreg(seed, C, tol)))
            for name, (a, b) in columns.items()]


class OOFStack(ClassifierMixin, BaseEstimator):
    """Two-level stacking: per-backbone level-1 out-of-fold probabilities (cross_val_predict) feed a level-2 model;
    level-1 models are then refit on every training row for new data, as StackingClassifier does.

    Unlike StackingClassifier it keeps the level-1 OOF matrix (``oof_level1_``), so the stack's own CV score
    needs only level-2 refits, not a nested CV of every level-1 model.
    """

    def __init__(self, columns: dict, level2: str = "logreg", folds: int = 5, seed: int = 0, C: float = LOGREG_C):
        self.columns = columns
        self.level2 = level2
        self.folds = folds
        self.seed = seed
        self.C = C

    def _cv(self):
        return StratifiedKFold(self.folds, shuffle=True, random_state=self.seed)

    def _level2(self):
        return logreg(self.seed, C=1.0) if self.level2 == "logreg" else PCALightGBM(pca_dims=None, seed=self.seed)

    def _level1_features(self, X):
        return np.hstack([m.predict_proba(X) for m in self.level1_])

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        # sklearn's default tolerance: level-1 probabilities need not be calibrated, the level-2 model
        # recalibrates them, and 4 backbones x (K + 1) tight fits would take minutes (BENCHMARKS.md).
        level1 = [est for _, est in per_backbone(self.columns, self.seed, self.C, tol=LEVEL1_TOL)]
        self.oof_level1_ = np.hstack([cross_val_predict(clone(est), X, y, cv=self._cv(), method="predict_proba")
                                      for est in level1])
        self.level1_ = [est.fit(X, y) for est in level1]
        self.level2_ = self._level2().fit(self.oof_level1_, y)
        return self

    def cv_predict_proba(self, y):
        """Out-of-fold probabilities of the whole stack on the training rows (level-2 CV on level-1 OOF)."""
        return cross_val_predict(self._level2(), self.oof_level1_, y, cv=self._cv(), method="predict_proba")

    def predict_proba(self, X):
        return self.level2_.predict_proba(self._level1_features(X))

    def predict(self, X):
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def build(model: str, columns: dict[str, tuple[int, int]], *, level2: str = "logreg", folds: int = 5, seed: int = 0,
          C: float = LOGREG_C):
    if model == "logreg":
        return logreg(seed, C)
    if model == "lgbm":
        return PCALightGBM(seed=seed)
    if model == "stack":
        return OOFStack(columns, level2=level2, folds=folds, seed=seed, C=C)
    if model == "avg":
        return VotingClassifier(per_backbone(columns, seed, C), voting="soft")
    raise ValueError(model)


def fit_with_oof(estimator, X, y, *, folds: int, seed: int):
    """Out-of-fold probabilities for every training row, then the estimator refit on all of them."""
    if isinstance(estimator, OOFStack):
        estimator.fit(X, y)
        return estimator.cv_predict_proba(y), estimator
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    oof = cross_val_predict(clone(estimator), X, y, cv=cv, method="predict_proba")
    return oof, estimator.fit(X, y)
