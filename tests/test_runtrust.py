"""Issue #30 items 5, 7, 9, 10, 11 and its run-folder tracebacks; issue #32 item 1 and --list's weights column:
submissions from the run's own classes and format, a log that is never a target nor half-written, leftovers
cleaned only under a dead writer's lease, a model.joblib checked before it is unpickled, and redaction of encoded
and coloured secrets."""
import base64
import builtins
import errno
import json
import os
import pickle
import re
import time

import pandas as pd
import pytest
from test_submit import make_run

from featstack import leftovers
from featstack import models as M
from featstack.commands import audit as audit_command
from featstack.commands import predict as predict_command
from featstack.commands import stack as stack_command
from featstack.commands import submit as submit_command
from featstack.errors import FeatstackError
from featstack.kaggle import redact
from featstack.predict import Predictor, load_fitted
from featstack.stack import LEFTOVER, list_runs, run_stack
from featstack.submission import build, submit
from featstack.synthetic import write_synthetic_store

from conftest import run_main


@pytest.fixture
def store(tmp_path):
    return write_synthetic_store(tmp_path / "features", "synth", classes=3, per_class=9, test_rows=4,
                                 widths={"resnet50": 8, "vgg16": 8})


@pytest.fixture
def run(store, tmp_path):
    return run_stack(store.root, folds=3, models_dir=tmp_path / "m", run_id="r")


# --- #30 item 5: a submission's class columns are the run's, from config.json ------------------------------------

def test_missing_or_extra_class_column_is_refused_in_one_line(tmp_path, capsys):
    run = make_run(tmp_path / "run", ["a", "b"], ["x", "y", "z"], "folders")
    missing = pd.DataFrame({"id": ["a", "b"], "x": [0.5, 0.25], "y": [0.5, 0.75]})  # rows still sum to 1
    missing.to_csv(run / "test_predictions.csv", index=False)
    with pytest.raises(FeatstackError, match=r"test_predictions\.csv: class columns z are missing"):
        build(run)
    code, _, err = run_main(submit_command.main, ["--run", run, "--submissions-dir", tmp_path / "subs"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "class columns z are missing" in err, err
    assert not (tmp_path / "subs").exists()
    missing.assign(z=0.0, w=0.0).to_csv(run / "test_predictions.csv", index=False)
    with pytest.raises(FeatstackError, match=r"test_predictions\.csv: columns w are not classes of the run"):
        build(run)


# --- #32 item 1: a format or sample that does not fit the run's dataset ------------------------------------------

def test_other_competitions_format_or_sample_is_refused_unless_forced(tmp_path, capsys):
    run = make_run(tmp_path / "run", ["1", "2"], ["cat", "dog"], "cats-dogs")
    code, _, err = run_main(submit_command.main, ["--run", run, "--format", "dog-breed", "--submissions-dir",
                                                  tmp_path / "subs"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--format dog-breed: run run was trained on a cats-dogs dataset" in err and "--force" in err
    assert not (tmp_path / "subs").exists()
    frame, fmt = build(run, "dog-breed", force=True)
    assert fmt == "dog-breed" and list(frame.columns) == ["id", "cat", "dog"]
    assert "written anyway (--force)" in capsys.readouterr().err
    # A dog-breed sample (same ids) given to a cats-dogs run: the sample's columns say it is another competition's.
    sample = tmp_path / "sample_submission.csv"
    pd.DataFrame({"id": ["1", "2"], "beagle": 0.5, "pug": 0.5}).to_csv(sample, index=False)
    with pytest.raises(FeatstackError, match=r"sample_submission\.csv has the columns id, beagle, pug, but a cats-dogs "
                                             r"submission of run run .* has id, label: is it another competition"):
        build(run, sample=sample)
    assert list(build(run, sample=sample, force=True)[0].columns) == ["id", "label"]
    # A generic run asked for dog-breed with no sample: nothing says it is that competition's.
    generic = make_run(tmp_path / "g", ["a", "b"], ["x", "y"], "folders")
    with pytest.raises(FeatstackError, match=r"--format dog-breed: run g was trained on a folders dataset"):
        build(generic, "dog-breed")
    fitting = tmp_path / "fits.csv"
    pd.DataFrame({"id": ["a", "b"], "y": 0.5, "x": 0.5}).to_csv(fitting, index=False)
    assert list(build(generic, "dog-breed", sample=fitting)[0].columns) == ["id", "y", "x"]


# --- #30 item 7: the log is never a target, and never half-written ------------------------------------------------

def test_out_can_never_name_the_log_or_a_run_file(tmp_path, capsys):
    subs = tmp_path / "subs"
    run = make_run(tmp_path / "run", ["1", "2"], ["cat", "dog"], "cats-dogs")
    submit(run, submissions_dir=subs)
    before = (subs / "log.csv").read_bytes()
    code, _, err = run_main(submit_command.main, ["--run", run, "--out", subs / "log.csv", "--submissions-dir", subs],
                            capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --out {subs / 'log.csv'}: that is the submissions log"), err
    assert (subs / "log.csv").read_bytes() == before
    for owned in (run / "test_predictions.csv", run / "sub.csv", subs / ".log.csv.lock", tmp_path / "old" / "log.csv"):
        with pytest.raises(FeatstackError, match=r"which featstack writes itself"):
            submit(run, out=owned, submissions_dir=subs)
    assert (subs / "log.csv").read_bytes() == before and not (run / "sub.csv").exists()


def _full_disk_at(monkeypatch, name):
    """Every write to a file called ``name`` stores half its bytes, then fails as a full disk does: through
    os.write and through a file object opened in featstack.submission."""
    real_write = os.write

    def is_target(fd):
        try:
            return os.readlink(f"/proc/self/fd/{fd}").endswith(os.sep + name)
        except OSError:
            return False

    def write(fd, data):
        if is_target(fd):
            real_write(fd, bytes(data[:len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    class Half:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def opener(file, *args, **kwargs):
        f = builtins.open(file, *args, **kwargs)
        return Half(f) if str(file).endswith(name) else f

    import featstack.submission as S
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(S, "open", opener, raising=False)


def test_full_disk_while_appending_leaves_the_log_byte_identical(tmp_path, capsys, monkeypatch):
    subs = tmp_path / "subs"
    run = make_run(tmp_path / "run", ["1", "2"], ["cat", "dog"], "cats-dogs")
    submit(run, submissions_dir=subs)
    before = (subs / "log.csv").read_bytes()
    _full_disk_at(monkeypatch, "log.csv")
    out = tmp_path / "again.csv"
    code, _, err = run_main(submit_command.main, ["--run", run, "--out", out, "--submissions-dir", subs], capsys)
    monkeypatch.undo()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {subs / 'log.csv'}: no space left on device while adding this submission's row; "
                          f"log.csv is unchanged, and {out} was written and is kept"), err
    assert (subs / "log.csv").read_bytes() == before
    assert pd.read_csv(out).shape == (2, 2)  # the submission is whole, as the message says


# --- #30 item 9: leftovers of a shared models folder: a live writer's lease keeps its folder ----------------------

def _foreign_lease(folder, pid, age=0.0):
    """The lease a writer in another PID namespace (another container or machine) keeps beside ``folder``."""
    path = folder.with_name(".featstack-lease" + folder.name)  # the name every featstack writer leases under
    path.write_text(json.dumps({"host": "other-box", "boot": "b00t", "pidns": "pid:[4026531836]", "pid": pid}))
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def _exited_pid():
    import subprocess
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def test_a_live_writers_folder_in_a_shared_models_folder_is_never_deleted(tmp_path, store, monkeypatch):
    import fcntl
    models = tmp_path / "m"
    models.mkdir()
    pid = _exited_pid()  # not a process here: the writer runs in another PID namespace
    live = models / f".elsewhere.tmp{pid}"
    live.mkdir()
    lease = _foreign_lease(live, pid)
    fd = os.open(lease, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held by the writer
    try:
        assert leftovers.dead_leftovers(models, LEFTOVER) == []
        run_stack(store.root, folds=3, models_dir=models, run_id="r")
        assert live.is_dir() and lease.exists()
    finally:
        os.close(fd)
    # Where locks are not shared between the machines, a fresh heartbeat alone keeps the folder.
    assert leftovers.dead_leftovers(models, LEFTOVER) == [] and live.is_dir()
    # A writer that stopped beating STALE_S ago is gone: its folder and its lease go.
    stamp = time.time() - leftovers.STALE_S - 5
    os.utime(lease, (stamp, stamp))
    run_stack(store.root, folds=3, models_dir=models, run_id="r2")
    assert sorted(p.name for p in models.iterdir()) == ["r", "r2"]


def test_the_lease_beats_while_its_writer_lives_and_goes_with_it(tmp_path, monkeypatch):
    monkeypatch.setattr(leftovers, "HEARTBEAT_S", 0.05)
    folder = tmp_path / f".w.tmp{os.getpid()}"
    with leftovers.lease(folder) as path:
        folder.mkdir()
        old = time.time() - 1000
        os.utime(path, (old, old))
        time.sleep(0.3)
        assert time.time() - path.stat().st_mtime < 5  # refreshed by the heartbeat
        assert json.loads(path.read_text())["pid"] == os.getpid()
        foreign = tmp_path / ".x.tmp1"
        foreign.mkdir()  # pid 1 lives here: without a lease, a pid that is alive keeps its folder as before
        assert leftovers.dead_leftovers(tmp_path, LEFTOVER) == []  # our own folder: locked by us
        folder.rmdir()
    assert not path.exists()


def test_a_lease_removed_by_a_cleanup_while_waited_for_is_taken_afresh(tmp_path, monkeypatch):
    import fcntl
    import threading
    folder = tmp_path / f".w.tmp{os.getpid()}"
    path = leftovers.lease_path(folder)
    path.write_text("{}")
    cleaner = os.open(path, os.O_RDWR)
    fcntl.flock(cleaner, fcntl.LOCK_EX)  # a cleanup that judged this name's earlier writer dead, deleting it

    def finish_cleanup():
        time.sleep(0.2)
        path.unlink()
        os.close(cleaner)
    threading.Thread(target=finish_cleanup).start()
    with leftovers.lease(folder):
        other = os.open(path, os.O_RDWR)  # the lease that is there now is the one held: nobody else can take it
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(other)
    monkeypatch.setattr(leftovers, "LOCK_WAIT_S", 0.2)
    held = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # the same work folder name, written elsewhere right now
    try:
        with pytest.raises(FeatstackError, match=r"holds this lease and writes the same work folder now"):
            with leftovers.lease(folder):
                pass
    finally:
        os.close(held)


# --- #30 item 10: model.joblib is checked against config.json's sha256 before it is unpickled ---------------------

class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # what a hostile pickle does on load: here, create a file


def test_changed_model_file_is_refused_before_it_is_loaded(run, tmp_path, capsys):
    config = json.loads((run / "config.json").read_text())
    assert len(config["model_sha256"]) == 64
    marker = tmp_path / "ran"
    (run / "model.joblib").write_bytes(pickle.dumps(_Marker(str(marker))))
    changed = r"model\.joblib: damaged or unreadable \(sha256 \w+… is not the \w+… that config\.json records"
    with pytest.raises(FeatstackError, match=changed):
        Predictor(run)
    photo = tmp_path / "p.png"
    from conftest import write_images
    write_images(tmp_path, ["p.png"])
    code, _, err = run_main(predict_command.main, [photo, "--run", run], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {run / 'model.joblib'}: damaged"), err
    from featstack.commands import serve as serve_command
    code, _, err = run_main(serve_command.main, ["--run", run, "--port", 0], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {run / 'model.joblib'}: damaged"), err
    with pytest.raises(FeatstackError, match=r"model\.joblib: damaged .* the model file was changed or replaced"):
        submit(run, submissions_dir=tmp_path / "subs")
    assert not marker.exists() and not (tmp_path / "subs").exists()


def test_run_folder_without_the_sha256_loads_with_a_warning(run, capsys):
    config = json.loads((run / "config.json").read_text())
    config.pop("model_sha256", None)
    estimator, classes = load_fitted(run, config)
    assert classes == config["classes"] and hasattr(estimator, "predict_proba")
    assert "records no sha256 of model.joblib" in capsys.readouterr().err


def test_model_file_that_is_a_pipe_or_device_is_refused_not_read_for_ever(run, tmp_path):
    import threading

    from featstack.predict import check_model_file
    config = json.loads((run / "config.json").read_text())
    (run / "model.joblib").unlink()
    os.mkfifo(run / "model.joblib")  # hashing it would block for ever (a link to /dev/zero would read for ever)
    raised = []

    def check():
        try:
            check_model_file(run, config)
        except FeatstackError as exc:
            raised.append(str(exc))
    t = threading.Thread(target=check, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # release the blocked open so the thread ends
        os.close(os.open(run / "model.joblib", os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail("check_model_file blocked on a named pipe")
    assert raised and "model.joblib: not a regular file; rebuild the run with: stack.py" in raised[0], raised


# --- #30: the run-folder tracebacks, each one line -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["label", "id"])
def test_class_named_like_a_column_is_refused_before_any_fold(tmp_path, store, capsys, monkeypatch, name):
    split = pd.read_csv(store.split_csv, dtype=str, keep_default_na=False)
    split.loc[split.label == "class_001", "label"] = name
    split.to_csv(store.split_csv, index=False)

    def no_fit(*args, **kwargs):
        raise AssertionError("a fold was fitted")
    monkeypatch.setattr(M, "fit_with_oof", no_fit)
    code, _, err = run_main(stack_command.main, ["--features", store.root, "--models-dir", tmp_path / "m",
                                                 "--folds", 3], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"a class is named {name!r}, which is a column of every predictions file" in err
    assert not (tmp_path / "m").exists() or not list((tmp_path / "m").iterdir())


@pytest.mark.parametrize("content", ["[]", "{}", '{"run_id": "r", "backbones": 3}', "null"])
def test_list_with_a_damaged_report_is_one_line(run, tmp_path, capsys, content):
    (run / "report.json").write_text(content)
    code, _, err = run_main(stack_command.main, ["--list", "--models-dir", tmp_path / "m"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {run / 'report.json'}: damaged") and "rerun stack.py" in err, err


def test_list_has_a_weights_column(run, tmp_path, capsys):
    config = json.loads((run / "config.json").read_text())
    table = list_runs(tmp_path / "m")
    assert list(table.weights) == ["random"]
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[:4] == ["id", "backbones", "model", "weights"]
    for value, shown in (("imagenet", "imagenet"), ("dir", "folder")):
        for attrs in config["feature_files"].values():
            attrs["weights"] = value
        (run / "config.json").write_text(json.dumps(config))
        assert list(list_runs(tmp_path / "m").weights) == [shown]


@pytest.mark.parametrize("drop", ["backbones", "feature_files"])
def test_config_without_backbones_is_one_line(run, tmp_path, capsys, drop):
    config = json.loads((run / "config.json").read_text())
    del config[drop]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(FeatstackError, match=rf"config\.json: damaged or unreadable \(no '{drop}' "):
        Predictor(run)
    from conftest import write_images
    write_images(tmp_path, ["p.png"])
    code, _, err = run_main(predict_command.main, [tmp_path / "p.png", "--run", run], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {run / 'config.json'}"), err


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00",
                                     b"\xff\xd8\xff\xe0\x10JFIF\xc3\x28", b""])
def test_sample_naming_a_binary_file_is_one_line(tmp_path, capsys, content):
    run = make_run(tmp_path / "run", ["1", "2"], ["cat", "dog"], "cats-dogs")
    sample = tmp_path / "photo.jpg"
    sample.write_bytes(content)
    code, _, err = run_main(submit_command.main, ["--run", run, "--sample", sample, "--submissions-dir",
                                                  tmp_path / "subs"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: --sample {sample}: "), err
    assert "sample_submission.csv" in err and not (tmp_path / "subs").exists()


def test_full_disk_while_the_audit_writes_is_one_line(run, capsys, monkeypatch):
    real = pd.DataFrame.to_csv

    def full(self, path=None, *args, **kwargs):
        if ".audit.tmp" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    code, _, err = run_main(audit_command.main, ["--run", run], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {run}: no space left on device while writing the audit"), err
    assert not [p.name for p in run.iterdir() if "audit" in p.name]  # no half folder, no lease


# --- #30 item 11: encoded, and colour-split, credentials are redacted ---------------------------------------------

def test_hex_base64_of_the_whole_file_bearer_and_ansi_split_secrets_are_redacted(tmp_path, monkeypatch):
    user, key = "json-user-y", "fedcba9876543210fedcba9876543210"
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    raw = json.dumps({"username": user, "key": key}).encode() + b"\n"
    (tmp_path / "kaggle.json").write_bytes(raw)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    forms = {"file as base64": b64(raw), "file as hex": raw.hex(), "file as HEX": raw.hex().upper(),
             "file as base64, no newline": b64(raw.strip()), "bearer": b64(f"Bearer {key}".encode()),
             "basic": b64(f"{user}:{key}".encode()), "key as hex": key.encode().hex(),
             "file as urlsafe base64": base64.urlsafe_b64encode(raw).decode().rstrip("=")}
    text = "\n".join(f"{what}: {form}" for what, form in forms.items())
    coloured = f"key: \x1b[1;31m{key[:10]}\x1b[0m\x1b[32m{key[10:]}\x1b[0m and {b64(raw)[:20]}\x1b[0m{b64(raw)[20:]}"
    shown = redact(text + "\n" + coloured)
    assert not [f for f in [*forms.values(), key] for half in (f[:16], f[-16:]) if half.lower() in shown.lower()], shown
    for what in forms:
        assert f"{what}: ***" in shown, shown
    assert re.sub(r"\x1b\[[0-9;]*m", "", shown).endswith("key: *** and ***"), shown  # the colours may stay


def test_a_key_inside_a_longer_base64_blob_is_redacted_at_any_offset(tmp_path, monkeypatch):
    user, key = "bob", "0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "kaggle.json").write_text(json.dumps({"username": user, "key": key}) + "\n")
    compact = json.dumps({"username": user, "key": key}, separators=(",", ":")).encode()  # the key at byte 25
    blobs = [base64.b64encode(b) for b in (compact, b"x" + key.encode() + b"yz", b"xy" + key.encode() + b"!")]
    blobs.append(base64.urlsafe_b64encode(b"Authorization: Basic " + key.encode()))
    for blob in blobs:
        shown = redact(blob.decode())
        assert "***" in shown and len(shown) < len(blob) - 20, (blob, shown)
    assert redact("an ordinary line: eyJ1c2Vy and abcdef") == "an ordinary line: eyJ1c2Vy and abcdef"


def test_list_names_a_copied_run_by_its_folder_which_is_what_run_takes(run, tmp_path, capsys):
    import shutil
    shutil.copytree(run, run.parent / "r-copy")
    table = list_runs(run.parent)
    assert sorted(table["id"]) == ["r", "r-copy"], table


@pytest.mark.parametrize("kind", ["folder", "device"])
def test_sample_naming_a_folder_or_device_says_so_not_no_such_file(tmp_path, capsys, kind):
    run = make_run(tmp_path / "run", ["1", "2"], ["cat", "dog"], "cats-dogs")
    sample = tmp_path if kind == "folder" else "/dev/null"
    code, _, err = run_main(submit_command.main, ["--run", run, "--sample", sample, "--submissions-dir",
                                                  tmp_path / "subs"], capsys)
    assert code == 2 and err == f"error: --sample {sample}: not a regular file; pass the competition's " \
                                "sample_submission.csv\n", err


@pytest.mark.parametrize("run_id", ["../escape", "a/b", ".hidden", "..", "a\\b"])
def test_a_run_id_that_is_not_one_plain_folder_name_is_refused(store, tmp_path, capsys, run_id):
    models = tmp_path / "deep" / "m"
    code, _, err = run_main(stack_command.main, ["--features", store.root, "--models-dir", models, "--run-id", run_id],
                            capsys)
    assert code == 2 and err.startswith(f"error: --run-id {run_id!r}: must be one folder name") and \
        len(err.splitlines()) == 1, err
    assert not (tmp_path / "deep" / "escape").exists() and not models.exists()
