"""Blending out-of-fold probabilities, linearly (simplex weights) or log-linearly (pooling), minimising log loss."""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax

EPS = 1e-15
# Log-linear pooling may sharpen its members (weights summing above 1) up to a cap on their sum that an inner CV
# chooses from POOL_CAPS (pool_cv). 3 was the fixed cap before: under-confident members (logreg at C = 0.01
# and 0.001 on both realistic worlds of benchmarks/worlds.py, 5 seeds) needed sums of 3.0-7.8, and held at 3 they lost
# holdout log loss (0.347 against 0.212, 0.504 against 0.315 at C = 0.001; benchmarks/bench_pool_cap.py). A
# cap is still needed: on members right on every training row the log loss falls without end as the weights grow
# (tests/test_models.py::test_pool_sharpens_separable_members_only_up_to_its_bound; SLSQP gave up at a sum of 11), and
# above 10 only members of near-uniform probabilities (C = 1e-4) gained. At C = 1 the fitted sums are 1.2-1.7 and no
# cap binds (a cap of 1 did worse there).
POOL_CAPS = (3.0, 10.0)
POOL_MAX_SUM = POOL_CAPS[-1]


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


def fold_wise(fit, apply, shape: tuple[int, int], splits) -> tuple[np.ndarray, list]:
    """A combination's own CV: ``fit(rows)`` on the other folds' rows, ``apply(rows, fitted)`` to this fold's rows
    only. Returns the out-of-fold probabilities (``shape``) and what each fold fitted."""
    out = np.zeros(shape, dtype=np.float64)
    fitted = []
    for train, valid in splits:
        fitted.append(fit(train))
        out[valid] = apply(valid, fitted[-1])
    return out, fitted


def blend_oof(probas: list[np.ndarray], y: np.ndarray, splits) -> tuple[np.ndarray, list[np.ndarray]]:
    """The blend's own CV: weights fitted on the other folds' OOF rows, applied to this fold's rows only."""
    return fold_wise(lambda rows: blend_weights([p[rows] for p in probas], y[rows]),
                     lambda rows, w: blend([p[rows] for p in probas], w), probas[0].shape, splits)


def pool_weights(logp: np.ndarray, y: np.ndarray, class_bias: bool = False,
                 max_sum: float = POOL_MAX_SUM) -> tuple[np.ndarray, np.ndarray]:
    """Log-linear pooling: member weights ``a >= 0`` with ``sum(a) <= max_sum`` (and, with ``class_bias``, class
    biases ``b``; else b = 0) minimising the log loss of ``p(c | x) ∝ exp(sum_m a_m * logp[x, m, c] + b_c)`` on
    labels ``y`` (a conditional logit).

    ``logp`` is rows x members x classes of log-probabilities. Weight 1 on one member and 0 elsewhere (b = 0) is that
    member itself, so the optimum is never worse than the best member on these rows; the weights may sum to more or
    less than 1 (a sharper or softer pool). The loss is convex in (a, b): SLSQP from equal weights finds it.
    """
    n, n_members, n_classes = logp.shape
    rows = np.arange(n)
    truth = logp[rows, :, y].sum(axis=0)  # the rows' log-probabilities of their own class, per member
    onehot = np.zeros((n, n_classes))
    onehot[rows, y] = 1.0

    def loss_and_grad(theta):
        a, b = theta[:n_members], theta[n_members:] if class_bias else 0.0
        log_q = log_softmax(np.einsum("nmc,m->nc", logp, a) + b, axis=1)
        q = np.exp(log_q)
        grad = [(np.einsum("nc,nmc->m", q, logp) - truth) / n] + ([(q - onehot).mean(axis=0)] if class_bias else [])
        return -log_q[rows, y].mean(), np.concatenate(grad)

    # b is shift-invariant (adding a constant to every b_c changes nothing); starting at 0 with gradients that sum to
    # 0 keeps it centred.
    start = np.concatenate([np.full(n_members, 1 / n_members)] + ([np.zeros(n_classes)] if class_bias else []))
    bounds = [(0.0, max_sum)] * n_members + [(None, None)] * (n_classes if class_bias else 0)
    total = {"type": "ineq", "fun": lambda t: max_sum - t[:n_members].sum(),
             "jac": lambda t: -np.concatenate([np.ones(n_members), np.zeros(len(t) - n_members)])}
    res = minimize(loss_and_grad, start, jac=True, method="SLSQP", bounds=bounds, constraints=[total],
                   options={"ftol": 1e-12, "maxiter": 1000})
    a = np.clip(res.x[:n_members], 0.0, None)
    return a, res.x[n_members:] if class_bias else np.zeros(n_classes)


def _pool_fits(logp: np.ndarray, y: np.ndarray, class_bias: bool, caps: list[float]) -> dict:
    """pool_weights at each cap of ``caps``, loosest first. The loss is convex, so a fit whose weights sum to less
    than a tighter cap is also that cap's fit: it is reused rather than fitted again."""
    fits, loose = {}, None
    for cap in sorted(caps, reverse=True):
        if loose is None or loose[0].sum() >= cap * (1 - 1e-6):
            loose = pool_weights(logp, y, class_bias, cap)
        fits[cap] = loose
    return fits


def pool_cv(logp: np.ndarray, y: np.ndarray, splits, class_bias: bool = False, caps=POOL_CAPS
            ) -> tuple[np.ndarray, list, tuple]:
    """The pool's own CV over ``splits`` (each fold's weights fitted on the other folds' rows), with the cap on the
    weights' sum chosen inside it. Returns the out-of-fold probabilities, each fold's (weights, biases, cap) and the
    refit's on every row.

    A fold's cap is the one of ``caps`` whose pool, fitted on its training rows less one other fold, scores the lowest
    log loss on that other fold, summed over the other folds (ties: the tighter cap): its own rows are never seen, so
    the CV stays nested. The refit's cap is chosen the same way over every fold. Fits on "every row but folds k and
    j" serve both fold k's and fold j's inner CV. Caps at or above the sum of the loosest fit's weights all give that
    fit (the loss is convex): when no tighter cap is left there is nothing to choose and no inner CV is fitted (the
    usual case at C = 1, where the weights sum to 1.2-1.7).
    """
    splits = list(splits)
    caps = sorted(caps)
    fold_of = np.empty(len(y), dtype=int)
    for k, (_, valid) in enumerate(splits):
        fold_of[valid] = k
    cache: dict[frozenset, dict] = {}

    def fits(left_out: frozenset) -> dict:
        if left_out not in cache:
            rows = np.flatnonzero(~np.isin(fold_of, list(left_out)))
            cache[left_out] = _pool_fits(logp[rows], y[rows], class_bias, caps)
        return cache[left_out]

    def choose(left_out: frozenset) -> float:
        full = fits(left_out)
        # one cap per distinct fit, the tightest of those giving it
        candidates = [c for k, c in enumerate(caps) if k == 0 or full[c] is not full[caps[k - 1]]]
        if len(candidates) == 1:
            return candidates[0]
        loss = np.zeros(len(candidates))
        for j, (_, valid) in enumerate(splits):
            if j not in left_out:
                inner = fits(left_out | {j})
                for i, cap in enumerate(candidates):
                    q = pool(logp[valid], *inner[cap])[np.arange(len(valid)), y[valid]]
                    loss[i] -= np.log(np.clip(q, EPS, 1.0)).sum()
        return candidates[int(np.argmin(loss))]

    oof = np.zeros((len(y), logp.shape[2]))
    fitted = []
    for k, (_, valid) in enumerate(splits):
        cap = choose(frozenset({k}))
        a, b = fits(frozenset({k}))[cap]
        oof[valid] = pool(logp[valid], a, b)
        fitted.append((a, b, cap))
    cap = choose(frozenset())
    return oof, fitted, (*fits(frozenset())[cap], cap)


def pool(logp: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The pooled probabilities of rows x members x classes log-probabilities ``logp``."""
    return np.exp(log_softmax(np.einsum("nmc,m->nc", logp, weights) + bias, axis=1))
