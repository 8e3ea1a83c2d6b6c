"""Submission stage: a run's test predictions -> the competition's exact CSV, validated before a byte is written."""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock

from . import reports
from .errors import FeatstackError
from .layouts import class_order
from .paths import SUBMISSIONS_DIR, DatasetPaths, RunPaths
from .split import is_disk_full, read_split, write_atomic
from .stack import newest_run, read_run_json

FORMATS = ("auto", "dog-breed", "cats-dogs", "generic")
LAYOUT_FORMATS = {"dog-breed": "dog-breed", "cats-dogs": "cats-dogs"}
SUM_TOLERANCE = 1e-6
LOG_COLUMNS = ["time", "run_id", "file", "competition", "message", "status", "cv_log_loss", "holdout_log_loss",
               "weights", "class_frequency_rows"]


def _first(items, n=5) -> str:
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f" … ({len(items)} in all)" if len(items) > n else "")


def _numeric_order(ids) -> list[str]:
    return sorted(ids, key=lambda i: (0, int(i)) if str(i).isdigit() else (1, str(i)))


def _check_values(ids: pd.Series, values: np.ndarray, columns, multiclass: bool, where: str) -> None:
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise FeatstackError(f"{where} values must be finite and within [0, 1]: id {ids.iloc[rows[0]]!r} column "
                             f"{columns[cols[0]]!r} is {values[rows[0], cols[0]]} ({len(rows)} bad values)")
    if multiclass:
        off = np.abs(values.sum(axis=1) - 1) > SUM_TOLERANCE
        if off.any():
            raise FeatstackError(f"{where} rows must sum to 1 ± {SUM_TOLERANCE}: ids {_first(ids[off])}")


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
    _check_values(ids, frame.iloc[:, 1:].to_numpy(dtype=float), list(frame.columns[1:]), kind == "multiclass",
                  "submission")


def read_predictions(run: Path) -> pd.DataFrame:
    """A run's test_predictions.csv as written, checked as read (reports.read_predictions) and not empty."""
    path = RunPaths(run).test_csv
    pred = reports.read_predictions(path)
    if pred.empty:
        raise FeatstackError(f"{path}: a header without rows: run {run.name} has no test predictions (its dataset "
                             "had no test images when stack.py ran), so there is nothing to submit")
    return pred


def expected_test_ids(run: Path, config: dict, sample_frame: pd.DataFrame | None, sample_path) -> tuple[list[str], str]:
    """The ids the competition expects, and where they come from: the sample file, else the dataset's split.csv."""
    if sample_frame is not None:
        return list(sample_frame["id"]), str(sample_path)
    features_dir = config.get("features_dir")
    paths = DatasetPaths(Path(features_dir)) if features_dir else None
    if paths is None or not paths.split_csv.is_file():
        raise FeatstackError(f"{run / 'config.json'}: the dataset's split.csv "
                             f"({paths.split_csv if paths else 'no features_dir recorded'}) is not there, so the "
                             "expected test ids are unknown; pass --sample with the competition's "
                             "sample_submission.csv")
    split = read_split(paths)
    return list(split.loc[split["split"] == "test", "id"]), str(paths.split_csv)


def _check_ids(pred: pd.DataFrame, expected: list[str], source: str, path: Path) -> None:
    present, wanted = set(pred["id"]), set(expected)
    missing = [i for i in expected if i not in present]
    if missing:
        raise FeatstackError(f"{path}: missing {len(missing)} test ids of {source}: {_first(missing)}; was the run "
                             "made on this dataset with every test image extracted?")
    extra = [i for i in pred["id"] if i not in wanted]
    if extra:
        raise FeatstackError(f"{path}: {len(extra)} ids are not test ids of {source}: {_first(extra)}")


def _clip(p: np.ndarray, clip: float | None) -> np.ndarray:
    if clip is None:
        return p
    if not 0 <= clip < 0.5:
        raise FeatstackError(f"--clip {clip}: must be at least 0 and below 0.5 (e.g. 0.005)")
    p = np.clip(p, clip, 1 - clip)
    return p / p.sum(axis=1, keepdims=True)


def build(run: Path, fmt: str = "auto", sample: str | Path | None = None, clip: float | None = None,
          labels: bool = False) -> tuple[pd.DataFrame, str]:
    """The validated submission table for a run, and the format it was built in."""
    config = read_run_json(run / "config.json")
    meta = config.get("dataset_meta") or {}
    if fmt not in FORMATS:
        raise FeatstackError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = LAYOUT_FORMATS.get(meta.get("layout"), "generic")
    pred = read_predictions(run)
    classes = list(pred.columns[1:])
    recorded = meta.get("sample_submission")
    sample_path = Path(sample) if sample else (Path(recorded) if recorded else None)
    if sample and not sample_path.is_file():
        raise FeatstackError(f"--sample {sample}: no such file")
    sample_frame = pd.read_csv(sample_path, dtype={"id": str}) if sample_path and sample_path.is_file() else None
    if sample_frame is not None and "id" not in sample_frame.columns:
        raise FeatstackError(f"{sample_path}: no id column; is it the competition's sample_submission.csv?")
    expected, source = expected_test_ids(run, config, sample_frame, sample_path)
    _check_ids(pred, expected, source, RunPaths(run).test_csv)
    proba = pred[classes].to_numpy(dtype=float)
    if fmt == "cats-dogs":
        if "dog" not in classes or len(classes) != 2:
            raise FeatstackError(f"--format cats-dogs needs classes cat and dog; this run has {_first(classes)}")
        ids = expected if sample_frame is not None else _numeric_order(expected)
        p_dog = _clip(proba, clip)[:, classes.index("dog")]
        frame = pd.DataFrame({"id": pred["id"], "label": p_dog}).set_index("id").reindex(ids).reset_index()
        columns, kind = ["id", "label"], "binary"
    elif fmt == "generic" and labels:
        frame = pd.DataFrame({"id": pred["id"], "label": np.array(classes)[proba.argmax(axis=1)]})
        frame = frame.set_index("id").reindex(expected).reset_index()
        ids, columns, kind = expected, ["id", "label"], "labels"
    else:
        ids = expected
        if fmt == "dog-breed" and sample_frame is not None:
            columns = list(sample_frame.columns)
        else:
            columns = ["id"] + class_order(classes)
        missing = [c for c in columns[1:] if c not in classes]
        if missing:
            raise FeatstackError(f"the run has no predictions for columns {_first(missing)} of "
                                 f"{sample_path or 'the class list'}; was it trained on this competition?")
        frame = pd.DataFrame(_clip(proba, clip), columns=classes)
        frame.insert(0, "id", pred["id"])
        frame = frame.set_index("id").reindex(ids)[columns[1:]].reset_index()
        kind = "multiclass"
    validate(frame, ids, columns, kind)
    return frame, fmt


def _log_problem(log: Path, what: str) -> FeatstackError:
    return FeatstackError(f"{log}: {what}; the submissions log is only ever appended to, so nothing was written: "
                          "save it as UTF-8 CSV or move it aside (or pass another --submissions-dir), then rerun")


def _read_log(log: Path) -> tuple[bytes, list[str] | None]:
    """The log's bytes and its header row (None when there is no log yet), or one line saying why it cannot be
    appended to."""
    try:
        raw = log.read_bytes()
    except FileNotFoundError:
        return b"", None
    except OSError as exc:
        raise _log_problem(log, f"cannot be read ({exc.strerror or exc})") from None
    if not raw.strip():
        return raw, None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # what some spreadsheets call "Unicode text"
        raise _log_problem(log, "UTF-16 text, not UTF-8")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise _log_problem(log, f"binary content (a NUL byte at byte {nul}), not a CSV table")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _log_problem(log, f"not UTF-8 text (byte {exc.start})") from None
    try:
        rows = csv.reader(io.StringIO(text, newline=""), strict=True)
        header = next(rows)
        for _ in rows:
            pass
    except csv.Error as exc:
        raise _log_problem(log, f"not a readable CSV table (line {rows.line_num}: {exc})") from None
    if not any(name.strip() for name in header):
        raise _log_problem(log, "its first line is not a header row")
    return raw, header


def check_log(log: Path) -> None:
    """Refuse, before anything is written, a submissions log that cannot be appended to."""
    _read_log(log)


def _header_end(raw: bytes) -> int:
    """The offset just past the header record's line end (a newline inside a quoted name does not end it)."""
    quoted = False
    for k, byte in enumerate(raw):
        if byte == 0x22:
            quoted = not quoted
        elif byte == 0x0A and not quoted:
            return k + 1
    return len(raw)


def append_log(log: Path, row: dict) -> None:
    """Add a row to submissions/log.csv. Append-only: rows and columns it does not know (a user's lb_score) stay as
    they are, byte for byte; a log lacking some of featstack's columns gains them at the end of its header only."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(log.with_name(f".{log.name}.lock"))):  # two submit.py at once: both rows kept
        raw, header = _read_log(log)
        if header is None:
            columns, head = LOG_COLUMNS, None
        else:
            columns = header + [c for c in LOG_COLUMNS if c not in header]
            end = _header_end(raw)
            head = raw[:end]
        newline = "\n" if head is not None and not head.endswith(b"\r\n") and head.endswith(b"\n") else "\r\n"
        line = io.StringIO()
        csv.writer(line, lineterminator=newline).writerow([row.get(c, "") if c in LOG_COLUMNS else "" for c in columns])
        if header is None or columns == header:
            with open(log, "a" if header is not None else "w", encoding="utf-8", newline="") as f:
                if header is None:
                    csv.writer(f, lineterminator=newline).writerow(columns)
                elif not raw.endswith(b"\n"):
                    f.write(newline)
                f.write(line.getvalue())
            return
        bom = b"\xef\xbb\xbf" if raw.startswith(b"\xef\xbb\xbf") else b""
        new_head = io.StringIO()
        csv.writer(new_head, lineterminator=newline).writerow(columns)
        rest = raw[end:]
        if rest.strip() and not rest.endswith(b"\n"):
            rest += newline.encode()
        elif not rest.strip():
            rest = b""
        # Only the header line changes; the rename makes the new log appear whole or not at all.
        body = bom + new_head.getvalue().encode() + rest + line.getvalue().encode()
        write_atomic(log, lambda p: p.write_bytes(body))


def _random_weights(config: dict) -> bool:
    files = (config.get("feature_files") or {}).values()
    return bool(config.get("random_weights")) or any(f.get("weights") == "random" for f in files)


def submit(run: str | Path | None = None, *, fmt: str = "auto", sample: str | Path | None = None,
           out: str | Path | None = None, clip: float | None = None, labels: bool = False,
           competition: str | None = None, message: str | None = None, models_dir: str | Path = "models",
           submissions_dir: str | Path = SUBMISSIONS_DIR, force: bool = False) -> Path:
    """Write (and optionally submit) a run's submission; the last line printed is the file written."""
    run = Path(run) if run else newest_run(models_dir)
    if not (run / "config.json").is_file():
        raise FeatstackError(f"--run {run}: not a stack.py run folder (no config.json)")
    config = read_run_json(run / "config.json")
    random_weights = _random_weights(config)
    if competition and random_weights and not force:
        raise FeatstackError(f"run {run.name} was trained on features of RANDOM weights (weights=random): sending it "
                             "to Kaggle is almost certainly a mistake; extract with ImageNet weights, or pass --force "
                             "to submit anyway")
    frame, fmt = build(run, fmt, sample, clip, labels)
    log = Path(submissions_dir) / "log.csv"
    check_log(log)  # a log that cannot take the row stops the run before the submission file is written
    out = Path(out) if out else Path(submissions_dir) / f"{run.name}.csv"
    compression = "gzip" if out.name.endswith(".gz") else None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lambda p: frame.to_csv(p, index=False, compression=compression))
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise FeatstackError(f"{out.parent}: no space left on device while writing {out.name}; nothing was "
                             "written: free space there (or pass another --out) and rerun") from None
    report_path = run / "report.json"
    report = read_run_json(report_path) if report_path.exists() else {}
    written_ids = set(frame["id"])
    filled = [i for i in config.get("test_ids_class_frequencies") or [] if i in written_ids]
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "run_id": run.name, "file": str(out),
           "competition": competition or "", "message": message or "", "status": "written",
           "cv_log_loss": (report.get("cv") or {}).get("log_loss", ""),
           "holdout_log_loss": (report.get("holdout") or {}).get("log_loss", ""),
           "weights": "random" if random_weights else "trained", "class_frequency_rows": len(filled)}
    print(f"{fmt} submission: {len(frame)} rows x {frame.shape[1]} columns, validated")
    if random_weights:
        print(f"note: run {run.name} was trained on features of RANDOM weights (weights=random: a smoke test or the "
              "offline demo); its predictions mean nothing for a leaderboard")
    if filled:
        print(f"note: {len(filled)} test ids could not be decoded (bad_images.csv) and carry the training class "
              f"frequencies: {_first(filled, 20)}")
    try:
        if competition:
            from .kaggle import submit_file
            row["status"] = "submit failed"  # until the tool says otherwise
            submit_file(competition, out, message or f"featstack {run.name}")
            row["status"] = "submitted"
    finally:
        from .kaggle import redact
        # The file path stays as is: a Kaggle username is often also the home folder's name.
        append_log(log, {k: v if k == "file" else redact(str(v)) for k, v in row.items()})
    print(out)
    return out
