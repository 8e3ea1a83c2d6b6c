"""Submission stage: a run's test predictions -> the competition's exact CSV, validated before a byte is written."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import FeatstackError
from .paths import SUBMISSIONS_DIR
from .split import write_atomic
from .stack import newest_run

FORMATS = ("auto", "dog-breed", "cats-dogs", "generic")
LAYOUT_FORMATS = {"dog-breed": "dog-breed", "cats-dogs": "cats-dogs"}
SUM_TOLERANCE = 1e-6
LOG_COLUMNS = ["time", "run_id", "file", "competition", "message", "status", "cv_log_loss", "holdout_log_loss"]


def _first(items, n=5) -> str:
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f" … ({len(items)} in all)" if len(items) > n else "")


def _numeric_order(ids) -> list[str]:
    return sorted(ids, key=lambda i: (0, int(i)) if str(i).isdigit() else (1, str(i)))


def validate(frame: pd.DataFrame, expected_ids: list[str], expected_columns: list[str], kind: str) -> None:
    """Raise naming the first offending ids or columns unless ``frame`` is exactly what the competition accepts."""
    if list(frame.columns) != expected_columns:
        missing = [c for c in expected_columns if c not in frame.columns]
        extra = [c for c in frame.columns if c not in expected_columns]
        detail = (f"missing {_first(missing)}" if missing else "") + ("; " if missing and extra else "") + \
                 (f"unexpected {_first(extra)}" if extra else "")
        raise FeatstackError(f"submission columns differ from the expected ones: {detail or 'same names, other order'}")
    ids = frame["id"].astype(str)
    dup = ids[ids.duplicated()]
    if len(dup):
        raise FeatstackError(f"submission has duplicate ids: {_first(dup.unique())}")
    expected, present = set(expected_ids), set(ids)
    missing = [i for i in expected_ids if i not in present]
    if missing:
        raise FeatstackError(f"submission lacks {len(missing)} expected ids: {_first(missing)}")
    extra = [i for i in ids if i not in expected]
    if extra:
        raise FeatstackError(f"submission has {len(extra)} ids the competition does not expect: {_first(extra)}")
    if kind == "labels":
        return
    values = frame.iloc[:, 1:].to_numpy(dtype=float)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise FeatstackError(f"submission values must be finite and within [0, 1]: id {ids.iloc[rows[0]]!r} column "
                             f"{frame.columns[1 + cols[0]]!r} is {values[rows[0], cols[0]]} ({len(rows)} bad values)")
    if kind == "multiclass":
        off = np.abs(values.sum(axis=1) - 1) > SUM_TOLERANCE
        if off.any():
            raise FeatstackError(f"submission rows must sum to 1 ± {SUM_TOLERANCE}: ids {_first(ids[off])}")


def _clip(p: np.ndarray, clip: float | None, renormalise: bool) -> np.ndarray:
    if clip is not None:
        if not 0 <= clip < 0.5:
            raise FeatstackError(f"--clip {clip}: must be at least 0 and below 0.5 (e.g. 0.005)")
        p = np.clip(p, clip, 1 - clip)
    return p / p.sum(axis=1, keepdims=True) if renormalise else p


def build(run: Path, fmt: str = "auto", sample: str | Path | None = None, clip: float | None = None,
          labels: bool = False) -> tuple[pd.DataFrame, str]:
    """The validated submission table for a run, and the format it was built in."""
    config = json.loads((run / "config.json").read_text())
    meta = config.get("dataset_meta") or {}
    if fmt not in FORMATS:
        raise FeatstackError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = LAYOUT_FORMATS.get(meta.get("layout"), "generic")
    pred = pd.read_csv(run / "test_predictions.csv", dtype={"id": str})
    if pred.empty:
        raise FeatstackError(f"{run / 'test_predictions.csv'}: the dataset has no test images to submit")
    classes = list(pred.columns[1:])
    sample_path = Path(sample) if sample else (Path(meta["sample_submission"]) if meta.get("sample_submission") else None)
    if sample and not sample_path.is_file():
        raise FeatstackError(f"--sample {sample}: no such file")
    sample_frame = pd.read_csv(sample_path, dtype={"id": str}) if sample_path and sample_path.is_file() else None
    proba = pred[classes].to_numpy(dtype=float)
    if fmt == "cats-dogs":
        if "dog" not in classes or len(classes) != 2:
            raise FeatstackError(f"--format cats-dogs needs classes cat and dog; this run has {_first(classes)}")
        ids = list(sample_frame["id"]) if sample_frame is not None else _numeric_order(pred["id"])
        p_dog = _clip(proba, clip, renormalise=True)[:, classes.index("dog")]
        frame = pd.DataFrame({"id": pred["id"], "label": p_dog}).set_index("id").reindex(ids).reset_index()
        columns, kind = ["id", "label"], "binary"
    elif fmt == "generic" and labels:
        frame = pd.DataFrame({"id": pred["id"], "label": np.array(classes)[proba.argmax(axis=1)]})
        ids, columns, kind = list(pred["id"]), ["id", "label"], "labels"
    else:
        if fmt == "dog-breed" and sample_frame is not None:
            columns, ids = list(sample_frame.columns), list(sample_frame["id"])
        else:
            columns, ids = ["id"] + sorted(classes), list(pred["id"])
        missing = [c for c in columns[1:] if c not in classes]
        if missing:
            raise FeatstackError(f"the run has no predictions for columns {_first(missing)} of "
                                 f"{sample_path or 'the class list'}; was it trained on this competition?")
        frame = pd.DataFrame(_clip(proba, clip, renormalise=True), columns=classes)
        frame.insert(0, "id", pred["id"])
        frame = frame.set_index("id").reindex(ids)[columns[1:]].reset_index()
        kind = "multiclass"
    validate(frame, ids, columns, kind)
    return frame, fmt


def append_log(log: Path, row: dict) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    new = not log.exists()
    with open(log, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in LOG_COLUMNS})


def submit(run: str | Path | None = None, *, fmt: str = "auto", sample: str | Path | None = None,
           out: str | Path | None = None, clip: float | None = None, labels: bool = False,
           competition: str | None = None, message: str | None = None, models_dir: str | Path = "models",
           submissions_dir: str | Path = SUBMISSIONS_DIR) -> Path:
    """Write (and optionally submit) a run's submission; the last line printed is the file written."""
    run = Path(run) if run else newest_run(models_dir)
    if not (run / "config.json").is_file():
        raise FeatstackError(f"--run {run}: not a stack.py run folder (no config.json)")
    frame, fmt = build(run, fmt, sample, clip, labels)
    out = Path(out) if out else Path(submissions_dir) / f"{run.name}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    compression = "gzip" if out.name.endswith(".gz") else None
    write_atomic(out, lambda p: frame.to_csv(p, index=False, compression=compression))
    report = json.loads((run / "report.json").read_text()) if (run / "report.json").exists() else {}
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "run_id": run.name, "file": str(out),
           "competition": competition or "", "message": message or "", "status": "written",
           "cv_log_loss": (report.get("cv") or {}).get("log_loss", ""),
           "holdout_log_loss": (report.get("holdout") or {}).get("log_loss", "")}
    print(f"{fmt} submission: {len(frame)} rows x {frame.shape[1]} columns, validated")
    try:
        if competition:
            from .kaggle import submit_file
            row["status"] = "submit failed"  # until the tool says otherwise
            submit_file(competition, out, message or f"featstack {run.name}")
            row["status"] = "submitted"
    finally:
        append_log(Path(submissions_dir) / "log.csv", row)
    print(out)
    return out
