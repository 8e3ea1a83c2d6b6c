"""stack / submit / predict keep their promises: damaged files, bad images, full disks, races, random weights."""
import errno
import json
import os
import pathlib
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
from filelock import FileLock
from PIL import Image

from featstack import models as M
from featstack.commands import predict as predict_command
from featstack.commands import stack as stack_command
from featstack.errors import FeatstackError
from featstack.predict import Predictor, predict
from featstack.stack import newest_run, run_stack
from featstack.submission import submit
from featstack.synthetic import write_synthetic_store

from conftest import ROOT, run_main, set_attrs, write_images


@pytest.fixture
def store(tmp_path):
    return write_synthetic_store(tmp_path / "features", "synth", classes=4, per_class=12, test_rows=6)


def _keep_rows(path, keep_ids):
    """Rewrite a feature file with only the rows of ``keep_ids`` (what a run that never extracted the others leaves)."""
    with h5py.File(path, "r") as f:
        ids, feats, attrs = f["ids"].asstr()[:], f["features"][:], dict(f.attrs)
    mask = np.isin(ids, list(keep_ids))
    with h5py.File(path, "w") as f:
        f["ids"] = np.asarray(ids[mask], dtype=object).astype("S")
        f["features"] = feats[mask]
        f.attrs.update({**attrs, "rows": int(mask.sum())})


def _split(store):
    return pd.read_csv(store.split_csv, dtype=str, keep_default_na=False)


# --- #10 item 2: a damaged entry file is refused in one line -------------------------------------------------------

def _zero_a_chunk(path):
    with h5py.File(path, "r") as f:
        info = f["features"].id.get_chunk_info(0)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        f.write(bytes(64))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:2000])


@pytest.mark.parametrize("damage", [_zero_a_chunk, _truncate])
def test_damaged_entry_file_is_refused_in_one_line(tmp_path, store, capsys, damage):
    entry = store.entry_file("vgg16_synthetic")
    damage(entry)
    code, out, err = run_main(stack_command.main, ["--features", store.root, "--models-dir", tmp_path / "m"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {entry}: ") and "extract_features.py" in err
    assert not (tmp_path / "m").exists()


def _small_run(store, tmp_path):
    return run_stack(store.root, folds=3, models_dir=tmp_path / "m", run_id="r")


@pytest.mark.parametrize("name, match", [
    ("model.joblib", r"model\.joblib: damaged or unreadable .*rebuild the run with: stack\.py --features .*synth "
                     r"--model logreg --backbones resnet50,vgg16"),
    ("config.json", r"config\.json: damaged or unreadable .*rerun stack\.py"),
])
def test_damaged_run_file_is_refused_by_predict_in_one_line(tmp_path, store, capsys, name, match):
    run = _small_run(store, tmp_path)
    damaged = run / name
    damaged.write_bytes(damaged.read_bytes()[:len(damaged.read_bytes()) // 2])  # a copy cut short
    photo = tmp_path / "p.jpg"
    write_images(tmp_path, ["p.jpg"])
    with pytest.raises(FeatstackError, match=match):
        Predictor(run)
    code, _, err = run_main(predict_command.main, [photo, "--run", run], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {run / name}"), err
    if name == "config.json":  # the newest run is found by reading every config.json: same one line
        with pytest.raises(FeatstackError, match=match):
            newest_run(tmp_path / "m")


def test_hidden_folders_of_runs_being_written_are_not_runs(tmp_path, store):
    run = _small_run(store, tmp_path)
    hidden = tmp_path / "m" / ".r2.tmp999"
    hidden.mkdir()
    (hidden / "config.json").write_text(json.dumps({"created": "9999"}))
    assert newest_run(tmp_path / "m") == run


# --- #10 item 3: bad images leave training and holdout; bad test images keep their row ----------------------------

def test_undecodable_images_are_left_out_and_test_rows_get_class_frequencies(tmp_path, cats_dogs, capsys):
    """The user's story: extraction lists two undecodable photos in bad_images.csv; stack.py must still run."""
    from featstack.extract import ExtractConfig, extract

    (cats_dogs / "train" / "cat.99.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (cats_dogs / "test1" / "99.jpg").write_bytes(b"")
    s = extract(ExtractConfig(cats_dogs, backbones=["vgg16"], weights="random", image_size=32,
                              features_dir=tmp_path / "f", holdout=0, progress=False))
    assert sorted(pd.read_csv(s.paths.bad_images_csv, dtype=str).id) == ["99", "cat.99"]
    capsys.readouterr()
    run = run_stack(s.paths.root, folds=2, models_dir=tmp_path / "m")
    out = capsys.readouterr().out
    assert f"2 images listed in {s.paths.bad_images_csv} (could not be decoded)" in out
    assert "1 left out of training and holdout" in out and "1 test images predicted as the training class" in out
    oof = pd.read_csv(run / "oof_predictions.csv", dtype={"id": str})
    assert "cat.99" not in set(oof.id) and len(oof) == 12
    test = pd.read_csv(run / "test_predictions.csv", dtype={"id": str}).set_index("id")
    assert sorted(test.index) == ["1", "2", "3", "4", "99"]
    frequencies = oof.label.value_counts(normalize=True)
    np.testing.assert_allclose(test.loc["99", ["cat", "dog"]].to_numpy(float), frequencies[["cat", "dog"]], atol=1e-12)
    report = json.loads((run / "report.json").read_text())
    assert report["bad_images"] == {"left_out": 1, "test_class_frequencies": 1} and report["rows"]["test"] == 5
    assert "1 undecodable images (bad_images.csv) were left out" in (run / "report.md").read_text()

    written = submit(run, submissions_dir=tmp_path / "subs")
    out = capsys.readouterr().out
    assert "1 test ids could not be decoded (bad_images.csv) and carry the training class frequencies: 99" in out
    sub = pd.read_csv(written, dtype={"id": str})
    assert list(sub.id) == ["1", "2", "3", "4", "99"]
    assert sub.set_index("id").loc["99", "label"] == pytest.approx(frequencies["dog"])
    assert pd.read_csv(tmp_path / "subs" / "log.csv").class_frequency_rows.iloc[-1] == 1


def test_allow_missing_keeps_its_meaning_beside_bad_images(tmp_path, store):
    split = _split(store)
    bad_train = split.id[split.split == "train"].iloc[0]
    bad_test = split.id[split.split == "test"].iloc[0]
    not_extracted = split.id[split.split == "train"].iloc[1]
    pd.DataFrame({"id": [bad_train, bad_test], "path": ["x.jpg", "y.jpg"],
                  "reason": "not an image (unrecognised format)"}).to_csv(store.bad_images_csv, index=False)
    everything = set(split.id)
    _keep_rows(store.entry_file("resnet50_synthetic"), everything - {bad_train, bad_test})
    _keep_rows(store.entry_file("vgg16_synthetic"), everything - {bad_train, bad_test, not_extracted})
    # Only the id that is merely not extracted yet stops the run; the undecodable ones are explained.
    with pytest.raises(FeatstackError, match=rf"1 of {len(split)} ids of split\.csv have no vgg16 features; "
                                             r"rerun extract_features\.py, or pass --allow-missing"):
        run_stack(store.root, folds=3, models_dir=tmp_path / "m")
    run = run_stack(store.root, folds=3, models_dir=tmp_path / "m", allow_missing=True)
    test_ids = set(pd.read_csv(run / "test_predictions.csv", dtype={"id": str}).id)
    oof_ids = set(pd.read_csv(run / "oof_predictions.csv", dtype={"id": str}).id)
    assert bad_test in test_ids and test_ids == set(split.id[split.split == "test"])
    assert not {bad_train, not_extracted} & oof_ids


def test_missing_features_while_extraction_holds_the_lock_say_wait(tmp_path, store):
    _keep_rows(store.entry_file("vgg16_synthetic"), set(_split(store).id[5:]))
    lock = FileLock(str(store.lock_file), timeout=0)
    with lock:
        with pytest.raises(FeatstackError, match=r"5 of .* have no vgg16 features yet; an extract_features\.py run is "
                                                 r"writing them now \(lock .*\.lock\): wait for it to finish") as err:
            run_stack(store.root, folds=3, models_dir=tmp_path / "m")
        assert "rerun" not in str(err.value)
    with pytest.raises(FeatstackError, match=r"rerun extract_features\.py"):
        run_stack(store.root, folds=3, models_dir=tmp_path / "m")


# --- #10 item 7: full disk, two runs with one run id, bad --batch-size ---------------------------------------------

def test_full_disk_while_writing_a_run_folder(tmp_path, store, capsys, monkeypatch):
    real_write_text = pathlib.Path.write_text

    def full_at_report(self, *args, **kwargs):
        if self.name == "report.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_at_report)
    models = tmp_path / "m"
    argv = ["--features", store.root, "--models-dir", models, "--folds", 3, "--run-id", "mine"]
    code, _, err = run_main(stack_command.main, argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {models}: no space left on device while writing run folder mine")
    assert os.listdir(models) == []  # not even the hidden folder it was being written in
    monkeypatch.undo()
    code, out, _ = run_main(stack_command.main, argv, capsys)
    assert code == 0 and out.strip().splitlines()[-1] == str(models / "mine")


def test_full_disk_on_a_real_small_tmpfs(tmp_path, store):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        with pytest.raises(FeatstackError, match=rf"^{mount}: no space left on device while writing run folder r;"):
            run_stack(store.root, folds=3, models_dir=mount, run_id="r")
        assert os.listdir(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_same_run_id_finished_meanwhile_keeps_the_winner_whole(tmp_path, store, monkeypatch):
    winner = run_stack(store.root, folds=3, models_dir=tmp_path / "m", run_id="w")
    real_fit = M.fit_with_oof

    def other_run_finishes_first(*args, **kwargs):
        result = real_fit(*args, **kwargs)
        if winner.exists():  # avg fits one model per backbone: the other process's rename lands during the first
            os.rename(winner, tmp_path / "m" / "same")
        return result

    monkeypatch.setattr(M, "fit_with_oof", other_run_finishes_first)
    with pytest.raises(FeatstackError, match=r"run folder .*same was written meanwhile by another stack\.py run"):
        run_stack(store.root, model="avg", folds=3, models_dir=tmp_path / "m", run_id="same")
    assert os.listdir(tmp_path / "m") == ["same"]
    assert json.loads((tmp_path / "m" / "same" / "config.json").read_text())["model"] == "logreg"


def test_two_processes_with_one_run_id(tmp_path, store):
    procs = {model: subprocess.Popen([sys.executable, str(ROOT / "stack.py"), "--features", str(store.root), "--model",
                                      model, "--folds", "3", "--models-dir", str(tmp_path / "m"), "--run-id", "same"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for model in ("logreg", "avg")}
    results = {model: (p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for model, p in procs.items()}
    assert sorted(code for code, _, _ in results.values()) == [0, 2], results
    won = next(m for m, (code, _, _) in results.items() if code == 0)
    _, _, err = next(r for r in results.values() if r[0] == 2)
    assert len(err.splitlines()) == 1 and err.startswith("error: run folder") and "same" in err, err
    assert os.listdir(tmp_path / "m") == ["same"]
    run = tmp_path / "m" / "same"
    assert json.loads((run / "config.json").read_text())["model"] == won
    assert json.loads((run / "report.json").read_text())["model"] == won


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_predict_batch_size_must_be_positive(tmp_path, capsys, value):
    photo = tmp_path / "p.jpg"
    Image.new("RGB", (8, 8)).save(photo)
    code, out, err = run_main(predict_command.main, [photo, "--batch-size", value], capsys)
    assert code == 2 and out == "" and f"--batch-size: {value!r}: give a positive whole number or auto" in err, err
    with pytest.raises(FeatstackError, match=r"--batch-size 0: give a positive whole number"):
        predict([str(photo)], batch_size=0)


# --- #10 item 10: a run on random-weight features says so everywhere ----------------------------------------------

def test_random_weights_are_said_in_every_report(tmp_path, store, capsys):
    def artefacts(run_id):
        run = run_stack(store.root, folds=3, models_dir=tmp_path / "m", run_id=run_id)
        return {"console": capsys.readouterr().out, "report.md": (run / "report.md").read_text(),
                "report.json": json.loads((run / "report.json").read_text())["weights"],
                "confusion.png": Image.open(run / "confusion.png").info["Title"]}

    random = artefacts("random")
    assert "RANDOM weights" in random["console"] and "**RANDOM weights**" in random["report.md"]
    assert random["report.json"] == "random" and random["confusion.png"] == "random: holdout (RANDOM weights)"
    for entry in store.entry_files():
        set_attrs(entry, weights="imagenet")
    trained = artefacts("trained")
    assert trained["report.json"] == "trained" and trained["confusion.png"] == "trained: holdout"
    assert "RANDOM" not in trained["console"] + trained["report.md"]


# --- #20 item 6: hidden folders of killed stack.py runs are removed by the next run, never a live run's ------------

STACK_KILLED = """
import os, signal, sys
from featstack import stack
# Killed when the finished run folder is about to be renamed into place: its hidden folder stays behind.
stack.os.rename = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)
stack.run_stack(sys.argv[1], folds=3, models_dir=sys.argv[2], run_id="killed")
"""


def test_folders_of_killed_runs_are_removed_by_the_next_run_never_a_live_ones(tmp_path, store):
    models = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-c", STACK_KILLED, str(store.root), str(models)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = list(models.glob(".killed.tmp*"))
    assert len(left) == 1 and (left[0] / "config.json").is_file(), "the killed run left its hidden folder"
    live = subprocess.Popen(["sleep", "120"])
    try:
        writing = models / f".another.tmp{live.pid}"  # a stack.py run still writing its folder
        writing.mkdir()
        run = _small_run(store, tmp_path)
        assert sorted(p.name for p in models.iterdir()) == [writing.name, run.name]
    finally:
        live.kill()
        live.wait()
