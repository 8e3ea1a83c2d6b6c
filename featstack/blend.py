"""Blending out-of-fold probabilities: simplex weights minimising log loss, and their honest (fold-wise) CV."""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

EPS = 1e-15


def blend_weights(probas: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the log loss of ``sum_b w_b * probas[b]`` on labels ``y``.

    Only each row's true-class probabilities matter, and the loss is convex in the weights, so SLSQP on the simplex
    finds the optimum from the equal-weights start.
    """
    n_models = len(probas)
    if n_models == 1:
        return np.ones(1)
    rows = np.arange(len(y))
    truth = np.column_stack([p[rows, y] for p in probas]).astype(np.float64)

    def loss_and_grad(w):
        q = np.maximum(truth @ w, EPS)
        return -np.mean(np.log(q)), -(truth / q[:, None]).mean(axis=0)

    res = minimize(loss_and_grad, np.full(n_models, 1 / n_models), jac=True, method="SLSQP",
                   bounds=[(0.0, 1.0)] * n_models,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones_like(w)}],
                   options={"ftol": 1e-12, "maxiter": 500})
    w = np.clip(res.x, 0.0, None)
    return w / w.sum()


def blend(probas: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    return sum(w * p for w, p in zip(weights, probas))


def blend_oof(probas: list[np.ndarray], y: np.ndarray, splits) -> tuple[np.ndarray, list[np.ndarray]]:
    """The blend's own CV: weights fitted on the other folds' OOF rows, applied to this fold's rows only."""
    out = np.zeros_like(probas[0], dtype=np.float64)
    fold_weights = []
    for train, valid in splits:
        w = blend_weights([p[train] for p in probas], y[train])
        out[valid] = blend([p[valid] for p in probas], w)
        fold_weights.append(w)
    return out, fold_weights
