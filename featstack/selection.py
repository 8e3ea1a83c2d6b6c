"""Which backbones pay off: each cached backbone's CV log loss alone, then greedy forward selection on blended OOF."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import models as M
from .blend import blend, blend_oof, blend_weights
from .errors import FeatstackError
from .features import load_features
from .paths import MODELS_DIR
from .reports import kaggle_log_loss
from .stack import _check_trainable

# A backbone earns its place by more than fitting noise: a step that improves the selection score by less than
# SELECT_TIE is a tie, and a chosen backbone whose blend weight prints as 0.000 adds nothing to the blend (issue #31:
# a pure-noise backbone was kept at weight 0.000 for a 3e-8 lower score, the optimiser's noise).
SELECT_TIE = 1e-6
ZERO_WEIGHT = 5e-4
COLUMNS = ["step", "backbone", "alone_log_loss", "selection_log_loss", "weights", "extract_seconds", "width"]


def greedy_selection(oofs: dict[str, np.ndarray], y: np.ndarray, splits) -> list[dict]:
    """Add, at each step, the backbone whose inclusion gives the lowest blended OOF log loss (weights fitted inside
    each fold of the blend's own CV); every backbone ends up ranked.

    Each step's figure is a *selection* score: the minimum over the candidates, so it is optimistic (the more
    candidates, the more); ``nested_estimate`` gives the honest figure for choosing this way."""
    chosen, steps = [], []
    remaining = list(oofs)
    while remaining:
        scored = {b: kaggle_log_loss(y, blend_oof([oofs[c] for c in chosen + [b]], y, splits)[0]) for b in remaining}
        best = min(remaining, key=scored.get)
        chosen.append(best)
        remaining.remove(best)
        weights = blend_weights([oofs[c] for c in chosen], y)
        steps.append({"backbone": best, "selection_log_loss": scored[best], "weight_values": list(weights),
                      "weights": " ".join(f"{c}={w:.3f}" for c, w in zip(chosen, weights))})
    return steps


def chosen_prefix(steps: list[dict]) -> int:
    """How many of the greedy path's first backbones to keep: the first step within SELECT_TIE of the lowest
    selection score."""
    scores = np.array([s["selection_log_loss"] for s in steps])
    return 1 + int(np.flatnonzero(scores <= scores.min() + SELECT_TIE)[0])


def chosen_backbones(steps: list[dict]) -> list[str]:
    """The chosen prefix's backbones, less those its blend gives a zero weight (to the printed 3 decimals)."""
    step = steps[chosen_prefix(steps) - 1]
    prefix = [s["backbone"] for s in steps[:chosen_prefix(steps)]]
    return [b for b, w in zip(prefix, step["weight_values"]) if w >= ZERO_WEIGHT]


def nested_estimate(oofs: dict[str, np.ndarray], y: np.ndarray, outer_splits, inner_folds: int, seed: int) -> float:
    """Honest log loss of the whole procedure (greedy path, prefix choice, blend weights): for each outer fold it
    runs on the other folds' rows alone, with its own inner CV, and scores the outer fold's rows."""
    out = np.zeros_like(next(iter(oofs.values())), dtype=np.float64)
    for train, valid in outer_splits:
        inner = list(M._folds(inner_folds, seed).split(train, y[train]))
        steps = greedy_selection({b: o[train] for b, o in oofs.items()}, y[train], inner)
        chosen = chosen_backbones(steps)
        weights = blend_weights([oofs[c][train] for c in chosen], y[train])
        out[valid] = blend([oofs[c][valid] for c in chosen], weights)
    return kaggle_log_loss(y, out)


def run_select(features: str | Path, *, backbones: list[str] | None = None, folds: int = 5, seed: int = 0,
               C: float | str = M.LOGREG_C, models_dir: str | Path = MODELS_DIR, run_id: str | None = None,
               allow_missing: bool = False) -> Path:
    """One CV per backbone, then the greedy table, printed and written to models/<run>/selection.csv."""
    C = M.parse_C(C)
    fs = load_features(features, backbones, allow_missing)
    _check_trainable(fs, folds)
    run_id = run_id or f"{fs.paths.name}-select-{time.strftime('%Y%m%d-%H%M%S')}"
    root = Path(models_dir) / run_id
    if root.exists():
        raise FeatstackError(f"run folder {root} already exists; pass another run id or remove it")
    index = {c: k for k, c in enumerate(fs.classes)}
    train = fs.rows("train")
    y = np.array([index[l] for l in fs.labels[train]])
    oofs, alone = {}, {}
    for name, block in fs.blocks.items():
        t0 = time.perf_counter()
        oofs[name] = M.CVLogReg(C=C, folds=folds, seed=seed).fit(block[train], y).oof_
        alone[name] = kaggle_log_loss(y, oofs[name])
        print(f"{name:<24} alone: CV log loss {alone[name]:.4f}  ({time.perf_counter() - t0:.1f} s)")
    splits = list(M._folds(folds, seed).split(train, y))
    rows = []
    steps = greedy_selection(oofs, y, splits)
    for step, s in enumerate(steps, 1):
        seconds = fs.entries[s["backbone"]].get("extract_seconds")
        rows.append({"step": step, "backbone": s["backbone"], "alone_log_loss": alone[s["backbone"]],
                     "selection_log_loss": s["selection_log_loss"], "weights": s["weights"],
                     "extract_seconds": np.nan if seconds is None else float(seconds),
                     "width": fs.blocks[s["backbone"]].shape[1]})
    table = pd.DataFrame(rows, columns=COLUMNS)
    print(f"\ngreedy forward selection ({len(train)} training rows, {folds}-fold CV, blend weights fitted inside "
          "each fold; selection_log_loss is the best candidate's at each step, so optimistic):")
    print(table.to_string(index=False, na_rep="", float_format=lambda v: f"{v:.4f}"))
    keep = chosen_prefix(steps)
    print(f"nested CV of the selection (path, prefix and weights chosen inside each of {folds} outer folds)...")
    nested = nested_estimate(oofs, y, splits, folds, seed)
    best = table.selection_log_loss.iloc[keep - 1]
    summary = {"chosen": chosen_backbones(steps), "selection_log_loss": float(best),
               "nested_log_loss": nested, "optimism": nested - float(best)}
    print(f"chosen: {', '.join(summary['chosen'])}: selection score {best:.4f} (optimistic), nested estimate "
          f"{nested:.4f} (honest: {nested - best:+.4f})")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{run_id}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        table.to_csv(tmp / "selection.csv", index=False)
        (tmp / "selection.json").write_text(json.dumps(summary, indent=2))
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(root)
    return root
