"""Holdout and CV reports: Kaggle log loss, accuracy, top-5, per-class scores, confusion matrix and confused pairs."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from .errors import FeatstackError

EPS = 1e-15
RANDOM_WEIGHTS_NOTE = ("note: these features come from RANDOM weights (weights=random: a smoke test or the offline "
                       "demo); the scores say nothing about what ImageNet features would give")


def kaggle_log_loss(y: np.ndarray, proba: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """Multi-class log loss as Kaggle scores it: rows renormalised, then clipped to [1e-15, 1 - 1e-15]; with
    ``sample_weight``, the weighted mean over rows (what a weighted fit minimises)."""
    p = proba / proba.sum(axis=1, keepdims=True)
    p = np.clip(p, EPS, 1 - EPS)
    losses = -np.log(p[np.arange(len(y)), y])
    return float(np.mean(losses) if sample_weight is None else np.average(losses, weights=sample_weight))


def scores(y: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict:
    labels = np.arange(len(classes))
    pred = proba.argmax(axis=1)
    out = {"rows": int(len(y)), "log_loss": kaggle_log_loss(y, proba), "accuracy": float(accuracy_score(y, pred))}
    if len(classes) > 5:  # with five classes or fewer the true class is always in the top five: not reported
        out["top5_accuracy"] = float(top_k_accuracy_score(y, proba, k=5, labels=labels))
    return out


def cv_estimate(report: dict) -> str:
    """Whether a run's CV figure is nested (every choice made inside the folds) or which choice made on it makes it
    optimistic: a C from a grid, level 2's C (chosen on the level-2 OOF it is scored on)."""
    chosen = [name for name, c in (report.get("C") or {}).items() if c.get("grid")]
    optimistic = []
    if chosen:
        optimistic.append(f"C chosen on it for {', '.join(chosen)}")
    if (report.get("level2") or {}).get("grid"):
        optimistic.append("level 2's C chosen on it")
    return "optimistic: " + "; ".join(optimistic) if optimistic else "nested"


def full_report(y: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict:
    """Headline scores, per-class precision / recall / F1 / support and the micro, macro, weighted averages."""
    labels = np.arange(len(classes))
    pred = proba.argmax(axis=1)
    rep = classification_report(y, pred, labels=labels, target_names=classes, output_dict=True, zero_division=0)
    per_class = {c: {k: float(v) for k, v in rep[c].items()} for c in classes}
    p, r, f, _ = precision_recall_fscore_support(y, pred, labels=labels, average="micro", zero_division=0)
    averages = {"micro": {"precision": float(p), "recall": float(r), "f1-score": float(f), "support": int(len(y))}}
    for avg in ("macro avg", "weighted avg"):
        averages[avg.split()[0]] = {k: float(v) for k, v in rep[avg].items()}
    return {**scores(y, proba, classes), "per_class": per_class, "averages": averages,
            "most_confused": confused_pairs(y, pred, classes)}


def confused_pairs(y: np.ndarray, pred: np.ndarray, classes: list[str], top: int = 15) -> list[dict]:
    cm = confusion_matrix(y, pred, labels=np.arange(len(classes)))
    off = cm.copy()
    np.fill_diagonal(off, 0)
    pairs = []
    for t, p in zip(*np.unravel_index(np.argsort(off, axis=None)[::-1], off.shape)):
        if off[t, p] == 0 or len(pairs) == top:
            break
        support = int(cm[t].sum())
        pairs.append({"true": classes[t], "predicted": classes[p], "count": int(off[t, p]), "support": support,
                      "text": f"{classes[t]} → {classes[p]}: {off[t, p]} of {support} ({off[t, p] / support:.0%})"})
    return pairs


def plot_confusion(y: np.ndarray, proba: np.ndarray, classes: list[str], path, title: str) -> None:
    """Row-normalised confusion matrix; label font and figure size scale so 120 classes stay readable."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    cm = confusion_matrix(y, proba.argmax(axis=1), labels=np.arange(n)).astype(float)
    cm /= np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = max(6.0, 0.16 * n + 3)
    font = max(4.0, min(10.0, 400 / max(n, 1)))
    # Margins from the longest label instead of tight_layout, which draws all 2n tick labels an extra time
    # (half of the plot's 2.3 s at 120 classes).
    label_inches = max(len(c) for c in classes) * font * 0.62 / 72 + 0.7
    fig = plt.figure(figsize=(side + label_inches + 1.2, side + label_inches + 0.6))
    width, height = fig.get_size_inches()
    ax = fig.add_axes((label_inches / width, label_inches / height, side / width, side / height))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=font)
    ax.set_yticks(range(n), classes, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        for t in range(n):
            for p in range(n):
                if cm[t, p] >= 0.01:
                    ax.text(p, t, f"{cm[t, p]:.2f}", ha="center", va="center", fontsize=font,
                            color="white" if cm[t, p] > 0.5 else "black")
    cax = fig.add_axes(((label_inches + side + 0.15) / width, label_inches / height, 0.2 / width, side / height))
    fig.colorbar(im, cax=cax, label="share of the true class")
    fig.savefig(path, dpi=100, metadata={"Title": title})  # the title also as PNG text, readable without OCR
    plt.close(fig)


def markdown(report: dict) -> str:
    cv, ho = report["cv"], report.get("holdout")
    lines = [f"# Run {report['run_id']}", "",
             f"Model `{report['model']}` on backbones {', '.join(report['backbones'])} "
             f"({report['rows']['train']} training rows, {report['rows']['holdout']} holdout, "
             f"{report['rows']['test']} test; {report['folds']}-fold CV).", ""]
    if report.get("weights") == "random":
        lines += ["**RANDOM weights** (weights=random: a smoke test or the offline demo): these scores say nothing "
                  "about what ImageNet features would give.", ""]
    bad = report.get("bad_images") or {}
    if bad.get("left_out") or bad.get("test_class_frequencies"):
        lines += [f"{bad.get('left_out', 0)} undecodable images (bad_images.csv) were left out of training and "
                  f"holdout; {bad.get('test_class_frequencies', 0)} undecodable test images were predicted as the "
                  "training class frequencies.", ""]
    excluded = report.get("excluded")
    if excluded:
        lines += [f"{excluded['train_rows']} training rows were left out (`--exclude {excluded['file']}`); "
                  "holdout rows are never excluded.", ""]
    top5 = "top5_accuracy" in cv
    kind = f", {cv['estimate']}" if "estimate" in cv else ""
    lines += ["| scored on | log loss | accuracy |" + (" top-5 accuracy |" if top5 else ""),
              "|---|---|---|" + ("---|" if top5 else ""),
              f"| {report['folds']}-fold CV (train{kind})"
              f" | {cv['log_loss']:.4f} | {cv['accuracy']:.4f} |" + (f" {cv['top5_accuracy']:.4f} |" if top5 else "")]
    if ho:
        lines.append(f"| holdout | {ho['log_loss']:.4f} | {ho['accuracy']:.4f} |"
                     + (f" {ho['top5_accuracy']:.4f} |" if top5 else ""))
        lines += ["", "## Holdout averages", "", "| average | precision | recall | F1 | support |",
                  "|---|---|---|---|---|"]
        for name, a in ho["averages"].items():
            lines.append(f"| {name} | {a['precision']:.4f} | {a['recall']:.4f} | {a['f1-score']:.4f} "
                         f"| {int(a['support'])} |")
        lines += ["", "## Most confused pairs (holdout)", ""]
        lines += [f"- {p['text']}" for p in ho["most_confused"]] or ["- none"]
        lines += ["", "## Per class (holdout)", "", "| class | precision | recall | F1 | support |",
                  "|---|---|---|---|---|"]
        for c, a in ho["per_class"].items():
            lines.append(f"| {c} | {a['precision']:.3f} | {a['recall']:.3f} | {a['f1-score']:.3f} "
                         f"| {int(a['support'])} |")
        lines += ["", "![confusion matrix](confusion.png)"]
    else:
        lines += ["", "No holdout rows (the split was made with --holdout 0): CV scores only."]
    if summary_lines(report):
        lines += ["", "## Fitted choices", ""] + [f"- {line}" for line in summary_lines(report)]
    return "\n".join(lines) + "\n"


def _choice_lines(name: str, c: dict, folds: int) -> list[str]:
    if not c.get("grid"):
        return []
    grid = ", ".join(f"C={k}: {g['log_loss']:.4f}" + (f" [{g['iteration_limit']} at iteration limit]"
                                                      if g["iteration_limit"] else "")
                     + (f" [{g['noise_floor']} at noise floor]" if g["noise_floor"] else "")
                     for k, g in c["grid"].items())
    lines = [f"{name}: C = {c['C']:g} chosen by {folds}-fold CV on training rows (CV log loss {grid})"]
    if c.get("edge"):
        lines.append(f"warning: {name}'s C = {c['C']:g} is at the edge of its grid: the best C may lie beyond it")
    return lines


def summary_lines(report: dict) -> list[str]:
    """Members, blend weights, level 2 and C chosen by CV (with the grid's CV log loss), for console and report.md."""
    lines = []
    if report.get("members"):
        source = ("members refit on every training row" if report.get("level1_predict") == "refit"
                  else "mean of each member's fold models")
        lines.append(f"members: {', '.join(report['members'])} (holdout and test from the {source})")
    if report.get("blend_weights"):
        lines.append("blend weights: " + ", ".join(f"{n} {w:.3f}" for n, w in report["blend_weights"].items()))
    for name, c in (report.get("C") or {}).items():
        lines += _choice_lines(name, c, report["folds"])
    if report.get("level2"):
        l2 = report["level2"]
        lines.append(f"level 2: {l2['model']} on the members' {l2.get('inputs', 'out-of-fold probabilities')}")
        if l2.get("weights"):
            bias = "; plus a bias per class" if l2.get("class_bias") else ""
            cap = (f" (sum {sum(l2['weights'].values()):.3f}, cap {l2['cap']:g}: chosen inside the CV)"
                   if l2.get("cap") else "")
            lines.append(f"level 2 pooling weights (one per member, >= 0{bias}): "
                         + ", ".join(f"{n} {w:.3f}" for n, w in l2["weights"].items()) + cap)
        lines += _choice_lines("level 2", l2, report["folds"])
    return lines


def predictions_frame(ids, proba: np.ndarray, classes: list[str], labels=None) -> pd.DataFrame:
    frame = pd.DataFrame(proba, columns=classes)
    if labels is not None:
        frame.insert(0, "label", labels)
    frame.insert(0, "id", ids)
    return frame


SUM_TOLERANCE = 1e-6  # how far a written row of probabilities may sum from 1 (floats written in full precision)


def _first_ids(ids, n: int = 5) -> str:
    ids = list(ids)
    return ", ".join(map(str, ids[:n])) + (f" … ({len(ids)} in all)" if len(ids) > n else "")


def read_predictions(path: Path, classes: list[str] | None = None, labelled: bool = False) -> pd.DataFrame:
    """A run's oof / holdout / test predictions file as ``predictions_frame`` wrote it, refused in one line naming
    the file and row unless every id is unique and every row is finite, non-negative and sums to 1.

    ``classes`` None takes the class columns from the file (every column after id, and label when ``labelled``).
    The one reader of these files: audit and submit both go through it.
    """
    path = Path(path)
    rebuild = f"remove the run folder {path.parent} and rerun stack.py to rebuild it"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FeatstackError(f"{path}: no such file; {rebuild}") from None
    except OSError as exc:
        raise FeatstackError(f"{path}: cannot be read ({exc.strerror or exc}); {rebuild}") from None
    if not raw or raw.isspace():
        raise FeatstackError(f"{path}: the file is empty ({len(raw)} bytes), not a predictions table; {rebuild}")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise FeatstackError(f"{path}: binary content (a NUL byte at byte {nul}), not a predictions CSV; {rebuild}")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FeatstackError(f"{path}: binary content (not UTF-8 text at byte {exc.start}), not a predictions CSV; "
                             f"{rebuild}") from None
    fixed = ["id", "label"] if labelled else ["id"]
    try:
        # Every fixed column as text ("NA" is a dog breed's id too); probabilities as numbers where they all parse.
        frame = pd.read_csv(io.BytesIO(raw), dtype=dict.fromkeys(fixed, str), na_filter=False)
    except (ValueError, pd.errors.ParserError) as exc:
        raise FeatstackError(f"{path}: not a readable CSV table ({str(exc).strip().splitlines()[0]}); "
                             f"{rebuild}") from None
    present = list(frame.columns)
    wanted = classes if classes is not None else [c for c in present if c not in fixed]
    if present[:len(fixed)] != fixed or not wanted or (classes is None and len(wanted) < 2):
        raise FeatstackError(f"{path}: expected the columns {', '.join(fixed)} and one probability column per "
                             f"class, found {_first_ids(present)}; {rebuild}")
    missing = [c for c in wanted if c not in present]
    extra = [c for c in present if c not in fixed and c not in wanted]
    if missing or extra:
        raise FeatstackError(f"{path}: " + (f"class columns {_first_ids(missing)} are missing" if missing else
                                            f"columns {_first_ids(extra)} are not classes of the run") + f"; {rebuild}")
    dup = frame["id"][frame["id"].duplicated()]
    if len(dup):
        raise FeatstackError(f"{path}: duplicate ids {_first_ids(dup.unique())}; each id must appear once; {rebuild}")
    if labelled and classes is not None:
        unknown = ~frame["label"].isin(classes)
        if unknown.any():
            k = int(np.flatnonzero(unknown)[0])
            raise FeatstackError(f"{path}: line {k + 2} (id {frame['id'].iat[k]!r}): label {frame['label'].iat[k]!r} "
                                 f"is not one of the run's classes; {rebuild}")
    text = frame[wanted]
    # A column holding anything but numbers ("nan", "", "x") is read as text: only those are converted, cell by cell.
    numeric = np.array([dtype.kind in "fiu" for dtype in text.dtypes], dtype=bool)
    values = np.empty(text.shape)
    values[:, numeric] = text.iloc[:, numeric].to_numpy(np.float64)
    for j in np.flatnonzero(~numeric):
        values[:, j] = pd.to_numeric(text.iloc[:, j], errors="coerce")
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        rows, cols = np.nonzero(bad)
        k, c = int(rows[0]), int(cols[0])
        cell = str(text.iat[k, c])
        raise FeatstackError(f"{path}: line {k + 2} (id {frame['id'].iat[k]!r}): column {wanted[c]!r} is "
                             f"{repr(cell) if cell.strip() else 'empty'}, not a probability in [0, 1] "
                             f"({len(np.unique(rows))} such "
                             f"rows); {rebuild}")
    # As read: a row that does not sum to 1 is a broken file, not something to renormalise away.
    off = np.abs(values.sum(axis=1) - 1) > SUM_TOLERANCE
    if off.any():
        k = int(np.flatnonzero(off)[0])
        raise FeatstackError(f"{path}: line {k + 2} (id {frame['id'].iat[k]!r}): the probabilities sum to "
                             f"{values[k].sum():.6g}, not 1 ({int(off.sum())} such rows); {rebuild}")
    if not all(dtype.kind == "f" for dtype in text.dtypes):  # whole numbers or converted text: as floats
        return pd.concat([frame[fixed], pd.DataFrame(values, columns=wanted)], axis=1)
    return frame if present == fixed + wanted else frame[fixed + wanted]
