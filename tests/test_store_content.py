"""What a stored vector stands for: the photo's bytes now (#30 item 1), finite values only (#30 item 4), and one kind
of weights per stack, said at extraction and in stack.py's refusal (#32 item 2)."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from featstack import store
from featstack.backbones import run_backbones
from featstack.decode import decode_batch
from featstack.extract import ExtractConfig, extract
from featstack.features import load_features
from featstack.paths import DatasetPaths
from featstack.store import CONTENT, EntryWriter, _write_h5, read_attrs, read_entry
from featstack.synthetic import write_synthetic_store

from conftest import make_weights_dir, run_main, set_attrs, write_images

RUN = dict(backbones=["vgg16"], weights="random", image_size=32, progress=False, shard_rows=4, batch_size=4)


def make_data(folder: Path) -> Path:
    data = folder / "cd"
    write_images(data / "train", [f"{c}.{n}.jpg" for c in ("cat", "dog") for n in range(6)], size=(40, 32))
    write_images(data / "test1", [f"{n}.jpg" for n in range(1, 5)], start_seed=100, size=(40, 32))
    return data


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A dataset and its extracted store, copied by each test that changes either."""
    base = tmp_path_factory.mktemp("content")
    data = make_data(base / "data")
    summary = extract(ExtractConfig(data, features_dir=base / "f", **RUN))
    return data, summary.paths.root, summary.jobs[0].writer.final.name


@pytest.fixture
def copied(extracted, tmp_path):
    data, root, name = extracted
    shutil.copytree(data, tmp_path / "data" / "cd")
    shutil.copytree(root, tmp_path / "f" / "cd")
    paths = DatasetPaths(tmp_path / "f" / "cd")
    paths.photo_stats_csv.unlink()  # it records the other copy's paths
    meta = json.loads(paths.dataset_json.read_text())
    paths.dataset_json.write_text(json.dumps({**meta, "data": str((tmp_path / "data" / "cd").resolve())}))
    return tmp_path / "data" / "cd", paths, name


def rerun(data: Path, paths: DatasetPaths):
    return extract(ExtractConfig(data, features_dir=paths.root.parent, **RUN))


def fresh_vector(backbone, photo: Path) -> np.ndarray:
    """The photo's features as a clean extraction computes them: decoded at the backbone's size, one forward pass."""
    arrays, errors = decode_batch([str(photo)], (backbone.input_key,))
    assert errors == [None]
    return run_backbones([backbone], arrays)[0][0][0]


def stored(path: Path) -> dict:
    entry = read_entry(path)
    return dict(zip(entry.ids, entry.features))


# --- #30 item 1: a replaced photo gets new features, a touched one keeps its own -----------------------------------

def test_a_replaced_photo_is_extracted_again_a_touched_one_is_not(copied, monkeypatch):
    data, paths, name = copied
    first = rerun(data, paths)  # records the copy's sizes, times and hashes
    assert first.jobs[0].extracted == 0 and first.jobs[0].cached == 16
    before = stored(paths.root / name)
    replaced, touched = data / "train" / "cat.2.jpg", data / "train" / "dog.3.jpg"
    write_images(data / "train", ["cat.2.jpg"], start_seed=77, size=(40, 32))  # same name, other pixels
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))  # touched, unchanged
    again = rerun(data, paths)
    job = again.jobs[0]
    assert (job.extracted, job.changed, job.cached, job.stored) == (1, 1, 15, 16)
    after = stored(paths.root / name)
    fresh = fresh_vector(job.backbone, replaced)
    assert not np.allclose(before["cat.2"], fresh, rtol=1e-3), "the replacement has other features"
    np.testing.assert_allclose(after["cat.2"], fresh, rtol=1e-5, atol=1e-6)
    assert all(np.array_equal(after[i], before[i]) for i in before if i != "cat.2"), "the others are kept as they were"
    stats = pd.read_csv(paths.photo_stats_csv).set_index("path")
    assert stats.loc[str(touched), "mtime_ns"] == touched.stat().st_mtime_ns, "the touched photo's new time is kept"
    assert stats.loc[str(replaced), "sha256"] == hashlib.sha256(replaced.read_bytes()).hexdigest()
    hashed = []  # a rerun with nothing changed stats every photo and hashes none
    real_digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, algo: hashed.append(f.name) or real_digest(f, algo))
    cached = rerun(data, paths)
    assert hashed == [] and cached.jobs[0].extracted == 0 and cached.jobs[0].changed == 0
    assert cached.jobs[0].backbone.model is None, "nothing to extract: no model built"


def test_a_rerun_killed_before_its_merge_keeps_the_new_features_not_a_duplicate_refusal(copied, monkeypatch):
    data, paths, name = copied
    write_images(data / "train", ["dog.1.jpg"], start_seed=55, size=(40, 32))
    real_merge = EntryWriter.merge

    def killed(self):
        self.flush()  # the new features are in a shard beside the old row: then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(EntryWriter, "merge", killed)
    with pytest.raises(KeyboardInterrupt):
        rerun(data, paths)
    monkeypatch.setattr(EntryWriter, "merge", real_merge)
    assert list(paths.root.glob(".shards/*/*.h5")), "the old row and the new one are both stored"
    resumed = rerun(data, paths)
    assert (resumed.jobs[0].extracted, resumed.jobs[0].changed, resumed.jobs[0].stored) == (0, 0, 16)
    backbone = resumed.jobs[0].backbone
    backbone.build()  # the resumed run had nothing left to extract
    np.testing.assert_allclose(stored(paths.root / name)["dog.1"], fresh_vector(backbone, data / "train" / "dog.1.jpg"),
                               rtol=1e-5, atol=1e-6)


def test_a_store_from_before_content_hashes_is_hashed_once_not_extracted_again(copied):
    data, paths, name = copied
    final = paths.root / name
    entry = read_entry(final)
    legacy = {k: v for k, v in entry.attrs.items() if k != store.ATTRS_SHA256}
    final.unlink()  # as the store wrote it before rows recorded their photo's sha256
    import h5py
    with h5py.File(final, "w") as f:
        f.create_dataset("ids", data=np.asarray(entry.ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("features", data=entry.features)
        f.attrs.update(legacy)
    summary = rerun(data, paths)
    assert summary.jobs[0].extracted == 0 and summary.jobs[0].cached == 16
    with h5py.File(final, "r") as f:
        by_id = dict(zip(f["ids"].asstr()[:], f[CONTENT].asstr()[:]))
    photo = data / "train" / "cat.4.jpg"
    assert by_id["cat.4"] == hashlib.sha256(photo.read_bytes()).hexdigest(), "the merge records each row's sha256"
    np.testing.assert_array_equal(read_entry(final).features, entry.features)
    write_images(data / "train", ["cat.4.jpg"], start_seed=99, size=(40, 32))
    assert rerun(data, paths).jobs[0].changed == 1, "from then on a replacement is seen"


# --- #30 item 4: non-finite features are never stored, and refused where an older store holds them ---------------

def write_scale_model(path: Path) -> Path:
    """A tiny Keras model file with an extreme scale: inf for every photo that is not all black, 0 for black ones."""
    import keras
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1.0, offset=1.0)(inputs)  # --preprocess tf: black is -1, so 0 here
    x = keras.layers.Rescaling(1e30)(x)
    x = keras.layers.ReLU()(x)  # keeps the two scales from being folded into one constant of inf (inf * 0 = NaN)
    x = keras.layers.Rescaling(1e10)(x)  # past float32's 3.4e38
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x)).save(path)
    return path


def black(folder: Path, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (40, 32)).save(folder / name)


def test_photos_with_non_finite_features_are_bad_images_and_never_stored(tmp_path, capsys):
    data = tmp_path / "data" / "cd"
    black(data / "train", [f"{c}.{n}.jpg" for c in ("cat", "dog") for n in range(6) if (c, n) != ("cat", 1)])
    write_images(data / "train", ["cat.1.jpg"], size=(40, 32))
    black(data / "test1", ["1.jpg", "2.jpg"])
    write_images(data / "test1", ["3.jpg", "4.jpg"], start_seed=100, size=(40, 32))
    model = write_scale_model(tmp_path / "scaled.keras")
    config = ExtractConfig(data, features_dir=tmp_path / "f", backbones=[str(model)], preprocess="tf",
                           image_size=32, progress=False, batch_size=4)
    summary = extract(config)
    inf_ids = ["cat.1", "3", "4"]
    reason = f"non-finite features (inf or NaN) from {model} ({summary.jobs[0].writer.final.name})"
    bad = pd.read_csv(summary.paths.bad_images_csv, dtype=str)
    assert sorted(bad.id) == sorted(inf_ids) and set(bad.reason) == {reason}
    entry = read_entry(summary.jobs[0].writer.final)
    assert sorted(entry.ids) == sorted(set(pd.read_csv(summary.paths.split_csv, dtype=str).id) - set(inf_ids))
    assert np.isfinite(entry.features).all()
    again = extract(config)
    # A model file is loaded when it is resolved (its readout is part of its cache identity), so what shows that
    # known non-finite photos are not run again is that nothing is left to extract
    assert (again.jobs[0].todo, again.jobs[0].extracted) == (set(), 0), "known non-finite photos are not run again"
    assert sorted(pd.read_csv(summary.paths.bad_images_csv, dtype=str).id) == sorted(inf_ids)
    fs = load_features(summary.paths.root)  # stackable: the bad photos are explained, not missing
    assert len(fs.ids) == 13


def test_a_backbone_that_gives_non_finite_features_for_most_photos_is_refused(tmp_path, capsys):
    from featstack.commands.extract import main
    data = make_data(tmp_path / "data")
    model = write_scale_model(tmp_path / "scaled.keras")
    code, out, err = run_main(main, ["--data", data, "--features-dir", tmp_path / "f", "--backbones", model,
                                     "--preprocess", "tf", "--image-size", "32", "--batch-size", "4",
                                     "--no-progress"], capsys)
    assert code == 2 and err.splitlines() == [
        f"error: backbone {model}: 8 of the 8 photos it has seen gave non-finite features (inf or NaN), so the model "
        "is broken for these inputs, not the photos; check its --preprocess (the input scale it was trained on), "
        "choose another layer (PATH:LAYER), or leave it out of --backbones"]
    assert not list((tmp_path / "f" / "cd").glob("*.h5")), "no feature file of it"


def put_nan(path: Path, row: int) -> str:
    """Write a NaN into one row through the store's own writer: a checksummed file, as an older featstack made it."""
    entry = read_entry(path)
    features = entry.features.copy()
    features[row, 0] = np.nan
    _write_h5(path, list(entry.ids), [features], features.shape[1], entry.attrs)
    return entry.ids[row]


def test_stack_and_audit_refuse_non_finite_features_and_extraction_repairs_them(tmp_path, copied, capsys):
    from featstack.commands import audit as audit_command
    from featstack.commands import stack as stack_command
    from featstack.stack import run_stack
    data, paths, name = copied
    final = paths.root / name
    run = run_stack(paths.root, model="logreg", folds=2, models_dir=tmp_path / "m", run_id="before")
    first = put_nan(final, 5)
    rebuild = (f"python extract_features.py --data {data.resolve()} --features-dir {tmp_path / 'f'} --name cd "
               "--backbones vgg16 --weights random --image-size 32")
    line = (f"error: {final}: 1 of 16 rows hold non-finite features (inf or NaN; first id {first!r}), which no model "
            f"can use; re-extract: {rebuild} (it extracts those photos again and lists the ones that stay non-finite "
            "in bad_images.csv)\n")
    for command, args in ((stack_command.main, ["--features", paths.root, "--models-dir", tmp_path / "m"]),
                          (audit_command.main, ["--run", run])):
        code, out, err = run_main(command, args, capsys)
        assert (code, err) == (2, line)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["before"]
    before = stored(final)
    summary = rerun(data, paths)  # what the refusal says to do
    assert summary.jobs[0].extracted == 1 and summary.jobs[0].stored == 16
    after = stored(final)
    assert np.isfinite(np.stack(list(after.values()))).all()
    np.testing.assert_allclose(after[first], fresh_vector(summary.jobs[0].backbone, data / "train" / f"{first}.jpg"),
                               rtol=1e-5, atol=1e-6)
    assert all(np.array_equal(after[i], before[i]) for i in before if i != first)


# --- #32 item 2: random-weight and trained-weight features ------------------------------------------------------

def test_stack_refusal_names_both_groups_and_the_backbones_value_of_each(tmp_path, capsys):
    from featstack.commands import stack as stack_command
    paths = write_synthetic_store(tmp_path / "f", "synth", classes=3, per_class=8, test_rows=3)
    resnet = paths.root / "resnet50_synthetic.h5"
    shutil.copy(resnet, paths.root / "resnet50_trained.h5")  # resnet50 in two configurations: named by stem
    set_attrs(paths.root / "resnet50_trained.h5", weights="imagenet")
    set_attrs(paths.root / "vgg16_synthetic.h5", weights="imagenet")
    code, out, err = run_main(stack_command.main, ["--features", paths.root, "--models-dir", tmp_path / "m",
                                                   "--backbones", "resnet50_synthetic,vgg16"], capsys)
    assert code == 2 and err == (
        "error: refusing to mix random-weight and trained-weight features: random weights: resnet50_synthetic; "
        "trained weights: vgg16; stack one group at a time: --backbones vgg16 (trained) or --backbones "
        "resnet50_synthetic (random)\n")
    for value in ("vgg16", "resnet50_synthetic"):  # each works as given
        fs = load_features(paths.root, value.split(","))
        assert len({e["weights"] == "random" for e in fs.entries.values()}) == 1


def test_extraction_warns_when_it_adds_one_kind_of_weights_to_a_store_of_the_other(copied, tmp_path, capsys):
    data, paths, name = copied  # the store holds vgg16 with random weights
    weights = make_weights_dir(tmp_path / "w", ["vgg16"], 32)
    trained = extract(ExtractConfig(data, features_dir=paths.root.parent, **{**RUN, "weights": str(weights)}))
    trained_stem = trained.jobs[0].writer.final.stem
    random_stem = Path(name).stem
    warnings = [line for line in capsys.readouterr().err.splitlines() if "weight features" in line]
    assert warnings == [f"warning: adding trained-weight features ({trained_stem}) to {paths.root}, which holds "
                        "random-weight features; stack.py refuses to mix the two, so stack each kind on its own: "
                        f"--backbones {random_stem} (random weights) or --backbones {trained_stem} (trained weights)"]
    assert read_attrs(trained.jobs[0].writer.final)["weights"] == "dir"
    (paths.root / name).unlink()  # the reverse: a store of trained features only gets random ones
    rerun(data, paths)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "weight features" in line]
    assert warnings == [f"warning: adding random-weight features ({random_stem}) to {paths.root}, which holds "
                        "trained-weight features; stack.py refuses to mix the two, so stack each kind on its own: "
                        f"--backbones {random_stem} (random weights) or --backbones {trained_stem} (trained weights)"]


@pytest.mark.parametrize("recorded", ["87c3df", "", "Z" * 64])
def test_a_damaged_sha256_in_photo_stats_is_hashed_afresh_not_stored_as_the_content(tmp_path, recorded):
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"the photo's bytes")
    paths = DatasetPaths(tmp_path / "store")
    paths.root.mkdir()
    st = os.stat(photo)
    # size and time match, so before the fix the recorded value was taken as the photo's sha256 unread
    pd.DataFrame([(str(photo), st.st_size, st.st_mtime_ns, recorded)], columns=store.STAT_COLUMNS).to_csv(
        paths.photo_stats_csv, index=False)
    content, changed = store.photo_content(paths, pd.DataFrame({"id": ["a"], "path": [str(photo)]}))
    assert content == {"a": hashlib.sha256(b"the photo's bytes").hexdigest()} and changed == set()
