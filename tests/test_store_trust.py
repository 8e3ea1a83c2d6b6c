"""The feature store under kills, damaged files, full disks and runs that fail early: what the README promises."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from featstack.errors import FeatstackError
from featstack.extract import ExtractConfig, extract
from featstack.paths import DatasetPaths
from featstack.split import assign_holdout
from featstack.store import EntryWriter, read_entry, remove_stray_tmp

from conftest import ROOT, make_weights_dir, run_main, write_images

RUN = dict(backbones=["vgg16"], weights="random", image_size=32, progress=False, shard_rows=4, batch_size=4)
CLI_RUN = ["--backbones", "vgg16", "--weights", "random", "--image-size", "32", "--shard-rows", "4",
           "--batch-size", "4", "--no-progress"]


def make_data(folder: Path) -> Path:
    data = folder / "cd"  # the store's name follows the folder's: every copy is "cd"
    write_images(data / "train", [f"{c}.{n}.jpg" for c in ("cat", "dog") for n in range(6)], size=(40, 32))
    write_images(data / "test1", [f"{n}.jpg" for n in range(1, 5)], start_seed=100, size=(40, 32))
    return data


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One uninterrupted extraction: the reference every interrupted or repaired store must equal."""
    base = tmp_path_factory.mktemp("clean")
    data = make_data(base / "data")
    summary = extract(ExtractConfig(data, features_dir=base / "f", **RUN))
    entry = read_entry(summary.jobs[0].writer.final)
    return {"data": data, "root": summary.paths.root, "file": summary.jobs[0].writer.final.name,
            "features": dict(zip(entry.ids, entry.features))}


def copy_store(clean, tmp_path) -> tuple[Path, DatasetPaths]:
    """A private copy of the data folder and of the clean store (the store's dataset.json points at the copy)."""
    data = tmp_path / "data" / "cd"
    shutil.copytree(clean["data"], data)
    paths = DatasetPaths.of(tmp_path / "f", "cd")
    shutil.copytree(clean["root"], paths.root)
    meta = json.loads(paths.dataset_json.read_text())
    paths.dataset_json.write_text(json.dumps({**meta, "data": str(data.resolve())}))
    return data, paths


def assert_equals_clean(path: Path, clean) -> None:
    entry = read_entry(path)
    assert len(entry.ids) == len(set(entry.ids)) == len(clean["features"]), "exactly one row per id"
    assert set(entry.ids) == set(clean["features"])
    expected = np.stack([clean["features"][i] for i in entry.ids])
    np.testing.assert_allclose(entry.features, expected, rtol=1e-5, atol=1e-6)


def run_child(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


# --- a kill during the final merge ------------------------------------------------------------------------------

KILL_AFTER_RENAME = """
import os, signal, sys
from featstack import store
store.EntryWriter._drop_shards = lambda self, shards: shards and os.kill(os.getpid(), signal.SIGKILL)
from featstack.commands.extract import main
main(sys.argv[1:], prog="extract_features.py")
"""


def test_kill_between_merge_rename_and_shard_deletion_then_rerun_equals_clean(tmp_path, clean):
    data = make_data(tmp_path / "data")
    proc = run_child(KILL_AFTER_RENAME, "--data", data, "--features-dir", tmp_path / "f", *CLI_RUN)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    paths = DatasetPaths.of(tmp_path / "f", "cd")
    final = paths.root / clean["file"]
    assert final.exists() and list(paths.root.glob(".shards/*/*.h5")), "killed after the rename, before the deletion"
    summary = extract(ExtractConfig(data, features_dir=tmp_path / "f", **RUN))
    assert summary.jobs[0].stored == 16 and summary.jobs[0].extracted == 0
    assert_equals_clean(final, clean)
    assert not list(paths.root.glob(".shards/*/*.h5")), "the absorbed shards are deleted, not merged again"


WRITER_KILLED = """
import os, signal, sys
from pathlib import Path
import numpy as np
from featstack import store
from featstack.paths import DatasetPaths
point = sys.argv[2]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "before-rename":  # the merged file is complete under its temporary name
    real_replace = os.replace
    store.os.replace = lambda a, b: die() if not str(a).count("/.shards/") else real_replace(a, b)
elif point == "after-rename":
    store.EntryWriter._drop_shards = lambda self, shards: shards and die()
elif point == "mid-deletion":  # one shard deleted, the others not
    real_unlink = Path.unlink
    def unlink(self, missing_ok=False):
        real_unlink(self, missing_ok=missing_ok)
        if "/.shards/" in str(self) and self.suffix == ".h5":
            die()
    Path.unlink = unlink
writer = store.EntryWriter(DatasetPaths(Path(sys.argv[1])), "e", {"backbone": "b"}, shard_rows=10)
rng = np.random.default_rng(0)
for start in range(0, 300, 10):
    writer.add([f"id{k}" for k in range(start, start + 10)], rng.standard_normal((10, 8), dtype=np.float32))
writer.merge()
"""


@pytest.mark.parametrize("point", ["before-rename", "after-rename", "mid-deletion"])
def test_merge_is_idempotent_whatever_instant_it_is_killed_at(tmp_path, point):
    root = tmp_path / "store"
    proc = run_child(WRITER_KILLED, root, point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    remove_stray_tmp(DatasetPaths(root))  # what the next run does first
    writer = EntryWriter(DatasetPaths(root), "e", {"backbone": "b"})
    assert writer.recover() == {f"id{k}" for k in range(300)}
    assert writer.merge() == 300
    entry = read_entry(writer.final)
    assert len(entry.ids) == 300 and sorted(entry.ids) == sorted(f"id{k}" for k in range(300))
    expected = np.random.default_rng(0).standard_normal((300, 8), dtype=np.float32)  # the child's draws, in order
    order = [int(i[2:]) for i in entry.ids]
    np.testing.assert_array_equal(entry.features, expected[order])
    assert not list(root.glob(".shards/*/*")) and not list(root.glob(".*.tmp*"))


def write_old_store_file(path: Path, ids, features, attrs):
    """A feature file as the store wrote it before checksums (what a user's existing store holds)."""
    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("features", data=features)
        f.attrs.update(attrs)
        f.attrs["rows"] = len(ids)


@pytest.mark.parametrize("differ", [False, True])
def test_a_store_holding_duplicate_ids_is_repaired_or_refused(tmp_path, clean, capsys, differ):
    data, paths = copy_store(clean, tmp_path)
    final = paths.root / clean["file"]
    old = read_entry(final)
    doubled = np.concatenate([old.features, old.features])  # what a rerun after a killed merge used to store
    if differ:
        doubled[len(old.ids) + 3, 0] += 1.0
    write_old_store_file(final, list(old.ids) * 2, doubled, old.attrs)
    if differ:
        with pytest.raises(FeatstackError, match=rf"{final}: id '{old.ids[3]}' is stored twice with different "
                                                 r"features.*rebuild with: python extract_features.py --data"):
            extract(ExtractConfig(data, features_dir=tmp_path / "f", **RUN))
        return
    summary = extract(ExtractConfig(data, features_dir=tmp_path / "f", **RUN))
    warning = [l for l in capsys.readouterr().err.splitlines() if "duplicate" in l]
    assert warning == [f"warning: {final}: dropped 16 duplicate rows (identical copies of stored ids, left by an "
                       "interrupted merge)"]
    assert summary.jobs[0].stored == 16 and summary.jobs[0].extracted == 0
    assert_equals_clean(final, clean)


# --- damaged files ----------------------------------------------------------------------------------------------

def test_zeroed_bytes_in_a_feature_chunk_fail_on_read_and_extraction_rebuilds(tmp_path, clean, capsys):
    data, paths = copy_store(clean, tmp_path)
    final = paths.root / clean["file"]
    with h5py.File(final, "r") as f:
        chunk = f["features"].id.get_chunk_info(0)
    with open(final, "r+b") as f:
        f.seek(chunk.byte_offset + chunk.size // 2)
        f.write(bytes(64))
    with pytest.raises(FeatstackError, match=rf"^{final}: damaged or unreadable feature file \(.*\); rebuild it with: "
                                             rf"python extract_features.py --data {data.resolve()} --features-dir "
                                             rf"{tmp_path / 'f'} --name cd --backbones vgg16 --weights random "
                                             r"--image-size 32 \(the run moves the damaged file aside\)$"):
        read_entry(final)
    summary = extract(ExtractConfig(data, features_dir=tmp_path / "f", **RUN))
    moved = [l for l in capsys.readouterr().err.splitlines() if "moved aside" in l]
    assert len(moved) == 1 and moved[0].startswith(f"{final}: damaged feature file")
    assert (paths.root / (clean["file"] + ".corrupt")).exists()
    assert summary.jobs[0].extracted == 16
    assert_equals_clean(final, clean)


def test_truncated_entry_file_is_moved_aside_and_rebuilt_without_traceback(tmp_path, clean, capsys):
    from featstack.commands.extract import main
    data, paths = copy_store(clean, tmp_path)
    final = paths.root / clean["file"]
    os.truncate(final, final.stat().st_size // 2)
    with pytest.raises(FeatstackError, match=rf"^{final}: damaged or unreadable feature file .*rebuild it with: "):
        read_entry(final)
    main(["--data", str(data), "--features-dir", str(tmp_path / "f"), *CLI_RUN])
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{final}: damaged feature file" in err
    assert (paths.root / (clean["file"] + ".corrupt")).exists()
    assert_equals_clean(final, clean)


# --- full disks ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["shard", "merge"])
def test_full_disk_is_one_line_and_the_rerun_equals_clean(tmp_path, clean, monkeypatch, where):
    data = make_data(tmp_path / "data")
    paths = DatasetPaths.of(tmp_path / "f", "cd")
    real_write = os.write

    def write(fd, buffer):  # the disk fills up under the shards folder (shard) or the store folder (merge)
        target = os.readlink(f"/proc/self/fd/{fd}")
        in_shards = "/.shards/" in target
        if target.startswith(str(paths.root)) and ".tmp" in target and in_shards == (where == "shard"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, buffer)

    monkeypatch.setattr(os, "write", write)
    folder = paths.root / ".shards" / clean["file"][:-3] if where == "shard" else paths.root
    with pytest.raises(FeatstackError, match=rf"^{folder}: no space left on device while writing .*h5 "
                                             r"\(nothing half-written is kept\); free space there and rerun"):
        extract(ExtractConfig(data, features_dir=tmp_path / "f", **RUN))
    assert not list(paths.root.rglob(".*.tmp*")), "nothing half-written"
    assert not (paths.root / clean["file"]).exists()
    monkeypatch.setattr(os, "write", real_write)
    summary = extract(ExtractConfig(data, features_dir=tmp_path / "f", **RUN))
    assert summary.jobs[0].extracted == (16 if where == "shard" else 0)  # finished shards are kept
    assert_equals_clean(paths.root / clean["file"], clean)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real file system that fills up: a tmpfs mount (root only), unmounted afterwards."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")

    def mount_with(kib: int, remount=False):
        opts = f"{'remount,' if remount else ''}size={kib}k"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mount)], capture_output=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()[:80]})")

    yield mount, mount_with
    subprocess.run(["umount", str(mount)], capture_output=True)


FILL_DISK = """
import sys
import numpy as np
from pathlib import Path
from featstack.cli import run_main
from featstack.paths import DatasetPaths
from featstack.store import EntryWriter

def fill():
    writer = EntryWriter(DatasetPaths(Path(sys.argv[1])), "e", {}, shard_rows=64)
    for k in range(100):
        writer.add([f"i{k}.{j}" for j in range(64)], np.ones((64, 512), np.float32))

run_main(fill)
"""


def test_full_tmpfs_while_writing_shards_then_rerun_with_space(tmp_path, clean, small_tmpfs):
    mount, mount_with = small_tmpfs
    data = make_data(tmp_path / "data")
    # Room for split.csv, dataset.json and bad_images.csv (a page each) and half the features' shards.
    mount_with(3 * 4 + (clean["root"] / clean["file"]).stat().st_size // 2048)
    root = mount / "cd"
    with pytest.raises(FeatstackError, match=rf"^{root}/.shards/.*: no space left on device while writing"):
        extract(ExtractConfig(data, features_dir=mount, **RUN))
    assert not list(root.rglob(".*.tmp*")) and not list(root.glob("*.h5"))
    # A process that hits the full disk exits with its one line (HDF5 left to itself crashes at exit).
    proc = subprocess.run([sys.executable, "-c", FILL_DISK, str(mount / "other")], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {mount}/other/.shards/e: no space left on device while writing "
        + proc.stderr.split("while writing ")[-1].strip()], proc.stderr[-2000:]
    mount_with(4096, remount=True)
    summary = extract(ExtractConfig(data, features_dir=mount, **RUN))
    assert 0 < summary.jobs[0].cached < 16, "the shards written before the disk filled are kept"
    assert_equals_clean(root / clean["file"], clean)


# --- runs that fail before extracting, small datasets, stray files, bad images --------------------------------------

@pytest.mark.parametrize("case, match", [
    ("bad engine", r"--engine nope: choose local or ray"),
    ("truncated weights", r"--weights .*/w: vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 cannot be loaded for "
                          r"vgg16 \(.*\); it is damaged or truncated: put an intact copy of Keras's file there"),
])
def test_a_run_that_fails_before_extracting_writes_no_split(tmp_path, capsys, case, match):
    from featstack.commands.extract import main
    data = make_data(tmp_path / "data")
    args = ["--data", str(data), "--features-dir", str(tmp_path / "f"), *CLI_RUN]
    if case == "bad engine":
        args += ["--engine", "nope"]
    else:
        weights = make_weights_dir(tmp_path / "w", ["vgg16"], 32)
        file = next(weights.iterdir())
        os.truncate(file, file.stat().st_size // 2)
        args += ["--weights", str(weights)]
    with pytest.raises(SystemExit) as exit:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and err[-1].startswith("error: ") and re.search(match, err[-1]), err
    paths = DatasetPaths.of(tmp_path / "f", "cd")
    assert not paths.split_csv.exists() and not paths.dataset_json.exists()


@pytest.mark.parametrize("labels, holdout, expected", [
    (["a", "b"] * 4, 0.1, {"a": 1, "b": 1}),  # 10 % of 8 is fewer than one per class: one per class
    (["a", "b", "c"] * 10, 0.1, {"a": 1, "b": 1, "c": 1}),
    (["a", "b"] * 10, 0.5, {"a": 5, "b": 5}),  # enough: the fraction as asked
])
def test_small_dataset_holds_out_one_image_per_class(labels, holdout, expected):
    table = pd.DataFrame({"id": [f"i{k}" for k in range(len(labels))], "path": "", "label": labels, "split": None})
    split = assign_holdout(table, holdout, seed=0)
    assert split[split.split == "holdout"].label.value_counts().to_dict() == expected
    assert set(split[split.split == "train"].label) == set(labels)


@pytest.mark.parametrize("labels, holdout, match", [
    (["a", "b"] * 2, 0.6, r"--holdout 0.6: holding out 3 of 4 labelled images leaves fewer training images than the "
                          r"2 classes; pass a smaller --holdout"),
    (["a", "b", "b"], 0.1, r"class 'a' has only 1 labelled image"),
])
def test_holdout_that_cannot_be_made_is_refused(labels, holdout, match):
    table = pd.DataFrame({"id": [f"i{k}" for k in range(len(labels))], "path": "", "label": labels, "split": None})
    with pytest.raises(FeatstackError, match=match):
        assign_holdout(table, holdout, seed=0)


def test_stray_tmp_files_are_removed_when_the_next_run_starts(tmp_path, clean):
    data, paths = copy_store(clean, tmp_path)
    shards = paths.root / ".shards" / clean["file"][:-3]
    shards.mkdir(parents=True)
    strays = [shards / ".01795994337515369324.h5.tmp4242", paths.root / f".{clean['file']}.tmp4242",
              paths.root / ".split.csv.tmp4242"]
    for stray in strays:
        stray.write_bytes(b"half a file")
    summary = extract(ExtractConfig(data, features_dir=tmp_path / "f", **RUN))
    assert summary.jobs[0].extracted == 0 and not any(s.exists() for s in strays)
    assert_equals_clean(paths.root / clean["file"], clean)


def test_bad_images_csv_follows_the_table_also_on_fully_cached_reruns(tmp_path, clean):
    data, paths = copy_store(clean, tmp_path)
    (data / "train" / "cat.7.jpg").write_text("not an image at all")
    (data / "train" / "dog.7.jpg").write_bytes(b"")
    first = extract(ExtractConfig(data, features_dir=tmp_path / "f", **RUN))
    assert sorted(first.bad.id) == ["cat.7", "dog.7"]
    again = extract(ExtractConfig(data, features_dir=tmp_path / "f", **RUN))
    assert again.jobs[0].backbone.model is None, "known bad images alone do not build the models again"
    assert sorted(pd.read_csv(paths.bad_images_csv).id) == ["cat.7", "dog.7"]
    write_images(data / "train", ["dog.7.jpg"], start_seed=7, size=(40, 32))  # the user fixes one
    fixed = extract(ExtractConfig(data, features_dir=tmp_path / "f", **RUN))
    assert fixed.jobs[0].extracted == 1 and list(pd.read_csv(paths.bad_images_csv).id) == ["cat.7"]
    (data / "train" / "cat.7.jpg").unlink()  # and deletes the other: a fully cached run
    cached = extract(ExtractConfig(data, features_dir=tmp_path / "f", **RUN))
    assert cached.jobs[0].extracted == 0 and len(pd.read_csv(paths.bad_images_csv)) == 0


# --- attributes that decide a result are verified ----------------------------------------------------------------

def _flip_input_size(path: Path) -> None:
    """One flipped bit in the input_size attribute (32 -> 96), nothing else touched: no chunk checksum sees it."""
    with h5py.File(path, "a") as f:
        f.attrs["input_size"] = int(f.attrs["input_size"]) ^ 64


def test_flipped_input_size_attribute_is_damage_for_stack_predict_and_extraction(tmp_path, clean, capsys):
    from featstack.commands import predict as predict_command
    from featstack.commands import stack as stack_command
    from featstack.stack import run_stack

    data, paths = copy_store(clean, tmp_path)
    final = paths.root / clean["file"]
    run = run_stack(paths.root, model="logreg", folds=2, models_dir=tmp_path / "m", run_id="before")
    _flip_input_size(final)
    rebuild = (f"python extract_features.py --data {data.resolve()} --features-dir {tmp_path / 'f'} --name cd "
               "--backbones vgg16 --weights random --image-size 32")  # the size the file was made with, not 96
    code, out, err = run_main(stack_command.main, ["--features", paths.root, "--models-dir", tmp_path / "m"], capsys)
    assert code == 2 and err == (f"error: {final}: damaged or unreadable feature file (its attributes do not match "
                                 f"their checksum); rebuild it with: {rebuild} (the run moves the damaged file "
                                 "aside)\n")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["before"], "no run from the damaged file"
    # predict.py answers from what the run recorded of its features: a flipped copy there is refused the same way.
    config = json.loads((run / "config.json").read_text())
    config["feature_files"]["vgg16"]["input_size"] = 96
    (run / "config.json").write_text(json.dumps(config))
    photo = data / "train" / "cat.0.jpg"
    code, out, err = run_main(predict_command.main, [photo, "--run", run], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and not out
    assert err.startswith(f"error: {run / 'config.json'}: damaged: the attributes it records for {clean['file']}: "
                          "its attributes do not match their checksum; rebuild the run with: stack.py --features ")
    summary = extract(ExtractConfig(data, features_dir=tmp_path / "f", **RUN))
    moved = [l for l in capsys.readouterr().err.splitlines() if "moved aside" in l]
    assert moved == [f"{final}: damaged feature file (its attributes do not match their checksum); moved aside to "
                     f"{clean['file']}.corrupt, its features are extracted again"]
    assert summary.jobs[0].extracted == 16 and read_entry(final).attrs["input_size"] == 32
    assert_equals_clean(final, clean)


def test_legacy_files_without_the_checksum_are_checked_by_name_and_sealed_by_extraction(tmp_path, clean, capsys):
    from featstack.store import ATTRS_SHA256
    data, paths = copy_store(clean, tmp_path)
    final = paths.root / clean["file"]
    with h5py.File(final, "a") as f:
        del f.attrs[ATTRS_SHA256]  # as every store written before the checksum existed
    assert read_entry(final).attrs["input_size"] == 32  # still readable: the name's digest vouches for it
    _flip_input_size(final)
    with pytest.raises(FeatstackError, match=rf"^{final}: damaged or unreadable feature file \(its attributes do "
                                             r"not match the digest in its file name\); rebuild it with: .*"
                                             r"--image-size 32 "):
        read_entry(final)
    _flip_input_size(final)  # back to 32
    summary = extract(ExtractConfig(data, features_dir=tmp_path / "f", **RUN))
    assert summary.jobs[0].extracted == 0 and "moved aside" not in capsys.readouterr().err
    with h5py.File(final, "r") as f:
        assert ATTRS_SHA256 in f.attrs, "the next extraction adds the checksum"
    assert_equals_clean(final, clean)
