"""End to end extraction: every image once, cached, incremental, resumable after kill -9, one writer, bad input kept."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from filelock import FileLock

from featstack.commands.extract import main as extract_main
from featstack.errors import FeatstackError
from featstack.extract import ExtractConfig, extract
from featstack.layouts import read_layout
from featstack.paths import DatasetPaths
from featstack.store import read_entry

from conftest import ROOT, run_main, write_images

FAST = dict(backbones=["vgg16"], weights="random", image_size=32, progress=False)  # the quickest to build


def cli(*args):
    """extract_features.py as its own process: for what only another process shows (a second writer)."""
    return subprocess.run([sys.executable, str(ROOT / "extract_features.py"), *map(str, args), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT)


def entry_of(summary, k=0):
    return read_entry(summary.jobs[k].writer.final)


def test_every_image_once_then_from_cache(tmp_path, cats_dogs):
    first = extract(ExtractConfig(cats_dogs, features_dir=tmp_path, backbones=["resnet50", "vgg16"], weights="random",
                                  image_size=32, progress=False))
    assert [j.extracted for j in first.jobs] == [16, 16]
    split = pd.read_csv(first.paths.split_csv, dtype=str)
    assert sorted(split.id) == sorted(entry_of(first).ids) == sorted(entry_of(first, 1).ids)
    assert set(split.split) == {"train", "holdout", "test"}
    again = extract(ExtractConfig(cats_dogs, features_dir=tmp_path, backbones=["resnet50", "vgg16"], weights="random",
                                  image_size=32, progress=False))
    assert [j.extracted for j in again.jobs] == [0, 0] and [j.cached for j in again.jobs] == [16, 16]
    assert all(j.backbone.model is None for j in again.jobs), "a fully cached rerun must not build models"
    assert np.array_equal(entry_of(again).features, entry_of(first).features)


def test_other_configuration_is_a_new_entry(tmp_path, cats_dogs):
    a = extract(ExtractConfig(cats_dogs, features_dir=tmp_path, **FAST))
    b = extract(ExtractConfig(cats_dogs, features_dir=tmp_path, **{**FAST, "pooling": "max"}))
    c = extract(ExtractConfig(cats_dogs, features_dir=tmp_path, **{**FAST, "tta": "flip"}))
    files = {j.writer.final for s in (a, b, c) for j in s.jobs}
    assert len(files) == 3 and all(f.exists() for f in files)
    assert entry_of(b).attrs["pooling"] == "max" and entry_of(c).attrs["tta"] == "flip"
    assert not np.allclose(entry_of(a).features, entry_of(c).features)


def test_incremental_append_keeps_split(tmp_path, cats_dogs):
    first = extract(ExtractConfig(cats_dogs, features_dir=tmp_path, **FAST))
    split_before = pd.read_csv(first.paths.split_csv, dtype=str)
    write_images(cats_dogs / "train", ["cat.6.jpg", "dog.6.jpg"], start_seed=77)
    second = extract(ExtractConfig(cats_dogs, features_dir=tmp_path, **FAST))
    assert second.jobs[0].extracted == 2 and second.jobs[0].cached == 16
    entry = entry_of(second)
    assert len(entry.ids) == 18 and {"cat.6", "dog.6"} <= set(entry.ids)
    split_after = pd.read_csv(first.paths.split_csv, dtype=str)
    assert split_after.iloc[:16].equals(split_before)
    fresh = extract(ExtractConfig(cats_dogs, features_dir=tmp_path / "fresh", **FAST))
    order = {i: k for k, i in enumerate(entry_of(fresh).ids)}
    np.testing.assert_allclose(entry.features, entry_of(fresh).features[[order[i] for i in entry.ids]],
                               rtol=1e-5, atol=1e-6)


def test_other_split_is_refused(tmp_path, cats_dogs):
    extract(ExtractConfig(cats_dogs, features_dir=tmp_path, **FAST))
    with pytest.raises(FeatstackError, match=r"made with --holdout 0.1 --seed 0; this run asks for --holdout 0.2"):
        extract(ExtractConfig(cats_dogs, features_dir=tmp_path, holdout=0.2, **FAST))


def test_bad_images_are_reported_not_fatal(tmp_path, cats_dogs, capsys):
    (cats_dogs / "train" / "cat.7.jpg").write_bytes(b"")
    (cats_dogs / "train" / "dog.7.jpg").write_text("not an image at all")
    code, out, err = run_main(extract_main, ["--data", cats_dogs, "--features-dir", tmp_path, "--backbones",
                                             "vgg16", "--weights", "random", "--image-size", 32, "--no-progress"],
                              capsys)
    assert code == 0 and "2 bad" in out, err
    bad = pd.read_csv(DatasetPaths.of(tmp_path, "catsdogs").bad_images_csv)
    assert sorted(bad.id) == ["cat.7", "dog.7"] and bad.reason.str.len().min() > 5
    entry = read_entry(next(DatasetPaths.of(tmp_path, "catsdogs").root.glob("*.h5")))
    assert len(entry.ids) == 16


@pytest.mark.parametrize("args, match", [
    (["--data", "{tmp}/nowhere"], "--data .*nowhere: no such file or folder"),
    (["--data", "{data}", "--backbones", "nope"], "unknown backbone 'nope'"),
    (["--data", "{data}", "--layout", "zip"], "--layout zip: unknown"),
    (["--data", "{data}", "--weights", "{tmp}"], "no resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 there"),
    # --image-size 0 fell back to the backbone's default size (the demo's too) and ran at it
    (["--data", "{data}", "--backbones", "vgg16,inception_v3", "--image-size", "0"],
     r"^error: --image-size 0: inception_v3 needs at least 75 px$"),
    (["--data", "{tmp}/demo", "--demo", "--weights", "random", "--image-size", "0"],
     r"^error: --image-size 0: resnet50 needs at least 32 px$"),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, cats_dogs, args, match, capsys):
    args = [a.format(tmp=tmp_path, data=cats_dogs) for a in args]
    if "--backbones" not in args:
        args += ["--backbones", "resnet50"]
    code, _, err = run_main(extract_main, [*args, "--features-dir", tmp_path / "f", "--no-progress"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(match, lines[0]), err
    assert not list((tmp_path / "f").rglob("*.h5")) and not list((tmp_path / "f").rglob("split.csv"))


def test_command_line_builds_every_field_of_the_run_configuration():
    """Each extract_features.py option lands in its ExtractConfig field: none is dropped or left at its default."""
    from dataclasses import fields

    from featstack.commands.extract import build_config, parse_args
    argv = ["--data", "d", "--layout", "folders", "--backbones", "vgg16, resnet50", "--weights", "random",
            "--preprocess", "tf", "--image-size", "64", "--pooling", "max", "--tta", "flip", "--features-dir", "fd",
            "--name", "n", "--holdout", "0.2", "--seed", "3", "--batch-size", "auto", "--precision", "bf16",
            "--decode-threads", "5", "--demo", "--engine", "ray", "--ray-address", "h:1", "--ray-actors", "2",
            "--ray-decode-cpus", "0.5", "--shard-rows", "7", "--no-progress"]
    config = build_config(parse_args(argv))
    assert config == ExtractConfig(
        data="d", layout="folders", backbones=["vgg16", "resnet50"], weights="random", preprocess="tf", image_size=64,
        pooling="max", tta="flip", features_dir="fd", name="n", holdout=0.2, seed=3, batch_size="auto",
        precision="bf16", decode_threads=5, demo=True, engine="ray", ray_address="h:1",
        ray_options={"actors": 2, "decode_cpus": 0.5}, shard_rows=7, progress=False)
    default = ExtractConfig()
    assert all(getattr(config, f.name) != getattr(default, f.name) for f in fields(ExtractConfig))


def test_second_writer_fails_at_once(tmp_path, cats_dogs):
    paths = DatasetPaths.of(tmp_path, "catsdogs")
    paths.root.mkdir(parents=True)
    with FileLock(str(paths.lock_file)):
        proc = cli("--data", cats_dogs, "--features-dir", tmp_path, "--backbones", "resnet50", "--weights",
                   "random", "--image-size", 75)
    assert proc.returncode == 2 and "being written by another extract_features.py run" in proc.stderr


@pytest.mark.slow
def test_kill_9_then_resume_gives_uninterrupted_features(tmp_path):
    data = tmp_path / "data" / "big"
    write_images(data / "train", [f"{c}.{n}.jpg" for c in ("cat", "dog") for n in range(50)])
    args = ["--data", data, "--backbones", "resnet50,vgg16", "--weights", "random", "--image-size", 32,
            "--batch-size", 4, "--shard-rows", 4]
    paths = DatasetPaths.of(tmp_path / "killed", "big")
    proc = subprocess.Popen([sys.executable, str(ROOT / "extract_features.py"), *map(str, args), "--no-progress",
                             "--features-dir", str(tmp_path / "killed")], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(paths.root.glob(".shards/*/*.h5"))) < 2:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    shards = list(paths.root.glob(".shards/*/*.h5"))
    assert shards and not list(paths.root.glob("*.h5")), "killed before the merge: only shards exist"
    same = dict(backbones=["resnet50", "vgg16"], weights="random", image_size=32, batch_size=4, shard_rows=4,
                progress=False)
    extract(ExtractConfig(data, features_dir=tmp_path / "killed", **same))  # the rerun, in this process
    extract(ExtractConfig(data, features_dir=tmp_path / "clean", **same))  # the uninterrupted run
    for killed in sorted(paths.root.glob("*.h5")):
        a = read_entry(killed)
        b = read_entry(tmp_path / "clean" / "big" / killed.name)
        assert sorted(a.ids) == sorted(b.ids) and len(a.ids) == 100
        order = {i: k for k, i in enumerate(b.ids)}
        np.testing.assert_allclose(a.features, b.features[[order[i] for i in a.ids]], rtol=1e-5, atol=1e-6)
    assert not list(paths.root.glob(".shards/*/*")), "shards are merged and removed"


def test_every_layout_extracts(tmp_path, dog_breed, folders, manifest):
    for data in (dog_breed, folders, manifest):
        s = extract(ExtractConfig(data, features_dir=tmp_path, holdout=0, **FAST))
        assert len(entry_of(s).ids) == s.images


def test_real_kaggle_photos(tmp_path, shared_data):
    data = shared_data / "dogs-vs-cats-sample"
    s = extract(ExtractConfig(data, features_dir=tmp_path, backbones=["resnet50"], weights="random", image_size=32,
                              batch_size=64, progress=False))
    entry = entry_of(s)
    assert len(entry.ids) == 800 and len(s.bad) == 0
    split = pd.read_csv(s.paths.split_csv, dtype=str)
    assert split.split.value_counts().to_dict() == {"train": 540, "test": 200, "holdout": 60}
    assert split[split.split == "holdout"].label.value_counts().to_dict() == {"cat": 30, "dog": 30}
    assert np.isfinite(entry.features).all() and entry.features.std(axis=0).mean() > 0


def test_bf16_features_stay_close_to_float32(tmp_path, cats_dogs):
    from conftest import make_weights_dir
    weights = make_weights_dir(tmp_path / "w", ["vgg16"], 32)  # the quickest to build and to run in bf16 on a CPU
    common = dict(backbones=["vgg16"], weights=str(weights), image_size=32, progress=False)
    f32 = extract(ExtractConfig(cats_dogs, features_dir=tmp_path / "f", **common))
    bf16 = extract(ExtractConfig(cats_dogs, features_dir=tmp_path / "f", precision="bf16", **common))
    a, b = entry_of(f32), entry_of(bf16)
    assert a.path != b.path and b.attrs["precision"] == "bf16"  # its own cache entry
    assert b.features.dtype == np.float32 and list(a.ids) == list(b.ids)
    rel = np.linalg.norm(b.features - a.features) / np.linalg.norm(a.features)
    assert 0 < rel <= 1e-2, rel


def test_each_model_is_built_and_compiled_in_a_line_of_its_own(tmp_path, cats_dogs, capsys):
    # No silent stretch: building a model and its first forward pass (tracing) are said model by model.
    extract(ExtractConfig(cats_dogs, backbones=["vgg16", "resnet50"], weights="random", image_size=32,
            features_dir=tmp_path / "features", progress=False))
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith("model ")]
    # (a build past heartbeat.INTERVAL says "10 s ... 20 s ..." on its line as it goes)
    assert [re.fullmatch(r"model (\S+) \(32 px, random weights\): building and compiling \.\.\. "
                         r"(\d+ s \.\.\. )*\d+\.\d s", l).group(1) for l in lines] == ["vgg16", "resnet50"]
    assert out.index(lines[-1]) < out.index("backbone ")  # before the summary table


def test_a_slow_backbone_says_which_batch_it_is_on_every_interval(tmp_path, cats_dogs, capsys, monkeypatch):
    # Issue #32: one slow backbone was silent 99 s between two steps of the bar. Each forward pass here takes
    # 0.3 s, the heartbeat's interval is 0.05 s: the build's line and the bar must say so while it runs.
    from featstack import backbones as bb
    from featstack import heartbeat
    monkeypatch.setattr(heartbeat, "INTERVAL", 0.05)
    features = bb.Backbone.features

    def slow(self, images):
        time.sleep(0.3)
        return features(self, images)

    monkeypatch.setattr(bb.Backbone, "features", slow)
    extract(ExtractConfig(cats_dogs, backbones=["vgg16"], weights="random", image_size=32, batch_size=8,
                          features_dir=tmp_path / "features"))
    out, err = capsys.readouterr()
    assert re.search(r"^model vgg16 \(32 px, random weights\): building and compiling \.\.\. (\d+ s \.\.\. )+"
                     r"\d+\.\d s$", out, re.MULTILINE), out
    batches = -(-len(read_layout(cats_dogs)[0]) // 8)
    assert batches > 1
    for k in range(1, batches + 1):  # every batch is named as it starts, and again while it runs
        assert f"running vgg16 on batch {k} of {batches}]" in err, err
        assert re.search(rf"still running vgg16 on batch {k} of {batches} \(\d+ s\)", err), err
