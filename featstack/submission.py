"""Submission stage: a run's test predictions -> the competition's exact CSV, validated before a byte is written."""
from __future__ import annotations

import csv
import errno
import io
import os
import sys
import time
import zipfile
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


def run_classes(run: Path, config: dict) -> list[str]:
    """The run's class list as its config.json records it: what a submission's class columns must be."""
    classes = config.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise FeatstackError(f"{run / 'config.json'}: damaged or unreadable (no 'classes' list of names); remove the "
                             f"run folder {run} and rerun stack.py to rebuild it")
    return classes


def read_predictions(run: Path, classes: list[str] | None = None) -> pd.DataFrame:
    """A run's test_predictions.csv as written, checked as read (reports.read_predictions) against the run's own
    class list (a missing or extra class column is refused), and not empty."""
    path = RunPaths(run).test_csv
    pred = reports.read_predictions(path, classes)
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


def read_sample(path: Path, given: bool) -> pd.DataFrame:
    """A sample submission as a table with an id column, or one line naming the file and what is wrong with it."""
    where = f"--sample {path}" if given else f"{path} (the dataset's sample submission)"
    fix = "pass the competition's sample_submission.csv with --sample"
    compressed = path.suffix.lower() in (".gz", ".zip", ".bz2", ".xz", ".zst")
    try:
        if not compressed:
            raw = path.read_bytes()
            nul = raw.find(b"\0")
            if nul >= 0:
                raise FeatstackError(f"{where}: binary content (a NUL byte at byte {nul}), not a CSV table; {fix}")
            try:
                raw.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise FeatstackError(f"{where}: not UTF-8 text (byte {exc.start}), not a CSV table; {fix}") from None
        frame = pd.read_csv(path, dtype={"id": str})
    except FeatstackError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # pandas' parser and empty-file errors too
        raise FeatstackError(f"{where}: cannot be read as a CSV table ({str(exc).strip().splitlines()[0][:100]}); "
                             f"{fix}") from None
    if "id" not in frame.columns:
        raise FeatstackError(f"{path}: no id column; is it the competition's sample_submission.csv?")
    return frame


def check_fit(run: Path, fmt: str, explicit: bool, labels: bool, meta: dict, classes: list[str],
              sample_frame: pd.DataFrame | None, sample_path: Path | None, force: bool) -> None:
    """Refuse a submission in a format that does not fit the run's dataset, unless ``force``: a sample submission
    whose columns are not the format's for the run's classes, or an explicit --format of another competition."""
    layout = meta.get("layout")
    problem = None
    if sample_frame is not None:
        got = [str(c) for c in sample_frame.columns[1:]]
        want = ["label"] if fmt == "cats-dogs" or (fmt == "generic" and labels) else classes
        if set(got) != set(want):
            problem = (f"{sample_path} has the columns id, {_first(got)}, but a {fmt} submission of run {run.name} "
                       f"(classes {_first(classes)}) has id, {_first(want)}: is it another competition's sample?")
    if problem is None and explicit and fmt in LAYOUT_FORMATS:
        if layout in LAYOUT_FORMATS and layout != fmt:
            problem = f"--format {fmt}: run {run.name} was trained on a {layout} dataset (classes {_first(classes)})"
        elif fmt == "dog-breed" and layout != "dog-breed" and sample_frame is None:
            problem = (f"--format dog-breed: run {run.name} was trained on a {layout or 'generic'} dataset (classes "
                       f"{_first(classes)}) and no sample submission says it is that competition's")
    if problem is None:
        return
    if not force:
        raise FeatstackError(f"{problem}; pass the right --sample or --format (auto follows the dataset), or --force "
                             f"to write it anyway")
    print(f"warning: {problem}; written anyway (--force)", file=sys.stderr)


def build(run: Path, fmt: str = "auto", sample: str | Path | None = None, clip: float | None = None,
          labels: bool = False, force: bool = False) -> tuple[pd.DataFrame, str]:
    """The validated submission table for a run, and the format it was built in."""
    config = read_run_json(run / "config.json")
    meta = config.get("dataset_meta") or {}
    if fmt not in FORMATS:
        raise FeatstackError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    explicit = fmt != "auto"
    if fmt == "auto":
        fmt = LAYOUT_FORMATS.get(meta.get("layout"), "generic")
    classes = run_classes(run, config)
    pred = read_predictions(run, classes)
    recorded = meta.get("sample_submission")
    sample_path = Path(sample) if sample else (Path(recorded) if recorded else None)
    if sample and not sample_path.is_file():
        what = "not a regular file" if sample_path.exists() else "no such file"  # a folder, a device, a pipe
        raise FeatstackError(f"--sample {sample}: {what}; pass the competition's sample_submission.csv")
    sample_frame = read_sample(sample_path, bool(sample)) if sample_path and sample_path.is_file() else None
    check_fit(run, fmt, explicit, labels, meta, classes, sample_frame, sample_path, force)
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
        if header is None:
            first = io.StringIO()
            csv.writer(first, lineterminator=newline).writerow(columns)
            body = first.getvalue().encode() + line.getvalue().encode()
            write_atomic(log, lambda p: p.write_bytes(body))  # a new log appears whole or not at all
            return
        if columns == header:
            _append_whole((b"" if raw.endswith(b"\n") else newline.encode()) + line.getvalue().encode(), log,
                          len(raw))
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


def _append_whole(data: bytes, log: Path, size: int) -> None:
    """Append ``data`` to ``log`` (``size`` bytes long, as read under the lock) in one write, or leave the log as it
    was: a short write (a full disk) or an error cuts the file back to its old length."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    try:
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({written} of {len(data)} bytes written)")
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


OWNED_NAMES = {"log.csv", ".log.csv.lock"}


def check_out(out: Path, log: Path) -> None:
    """Refuse an --out that names a file featstack owns: the submissions log (and its lock), or anything inside a
    run folder or a feature store; a submission written there would destroy it."""
    target = out.resolve()
    what = None
    if target == log.resolve():
        what = f"the submissions log {log}"
    elif target == log.with_name(f".{log.name}.lock").resolve() or target.name in OWNED_NAMES:
        what = "the name of a submissions log (or its lock), in this or another --submissions-dir"
    else:
        for folder in target.parents:
            if (folder / "config.json").is_file() and (folder / "report.json").is_file():
                what = f"inside the run folder {folder}"
            elif (folder / "split.csv").is_file() and (folder / "dataset.json").is_file():
                what = f"inside the feature store {folder}"
            if what:
                break
    if what:
        raise FeatstackError(f"--out {out}: that is {what}, which featstack writes itself: a submission there would "
                             "overwrite it; nothing was written: pass another --out (or leave it out for "
                             "submissions/<run-id>.csv)")


def check_model(run: Path, config: dict) -> None:
    """A run whose model.joblib differs from the sha256 its config.json records is not submitted: its predictions
    may not be that model's either. Runs from before the record are submitted as they are (nothing is unpickled)."""
    if config.get("model_sha256") is None:
        return
    from .predict import check_model_file
    check_model_file(run, config)


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
    log = Path(submissions_dir) / "log.csv"
    out = Path(out) if out else Path(submissions_dir) / f"{run.name}.csv"
    check_out(out, log)
    check_model(run, config)
    frame, fmt = build(run, fmt, sample, clip, labels, force)
    check_log(log)  # a log that cannot take the row stops the run before the submission file is written
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
        try:
            append_log(log, {k: v if k == "file" else redact(str(v)) for k, v in row.items()})
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            # The submission file is whole (written through a rename) and stays: it may be what Kaggle now scores.
            sent = " and submitted" if row["status"] == "submitted" else ""
            raise FeatstackError(f"{log}: no space left on device while adding this submission's row; log.csv is "
                                 f"unchanged, and {out} was written{sent} and is kept: free space there, then rerun "
                                 "submit.py" + (" without --submit" if sent else "") + " to log it") from None
    print(out)
    return out
