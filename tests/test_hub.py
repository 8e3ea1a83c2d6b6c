"""keras-hub presets as backbones: stored vectors equal keras-hub's own recipe; identity, refusals, predict and app."""
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from featstack import backbones as bb
from featstack.decode import decode_rgb
from featstack.errors import FeatstackError
from featstack.extract import ExtractConfig, extract
from featstack.store import read_entry

from conftest import ROOT, make_weights_dir, photo

pytest.importorskip("keras_hub")

# Landscape, portrait, square, a sliver and a thumbnail: the converter crops (or stretches) each its own way.
SIZES = [(200, 37), (31, 150), (97, 96), (300, 200), (56, 56), (75, 20), (13, 90), (120, 90)]


@pytest.fixture
def odd_photos(tmp_path):
    data = tmp_path / "data" / "odd"
    (data / "train").mkdir(parents=True)
    (data / "test1").mkdir()
    for k, size in enumerate(SIZES):
        img = photo(300 + k, size)
        img = img.convert("L") if k == 6 else img  # a greyscale photo goes through the same one decode
        img.save(data / "train" / f"{('cat', 'dog')[k % 2]}.{k}.jpg", quality=90)
    for k in range(3):
        photo(400 + k, SIZES[k * 2 + 1]).save(data / "test1" / f"{k + 1}.jpg")
    return data


def photo_paths(summary, data):
    table = pd.read_csv(summary.paths.split_csv, dtype=str)
    return {i: str(data / ("test1" if s == "test" else "train") / f"{i}.jpg") for i, s in zip(table.id, table.split)}


def keras_hub_recipe(folder, kind, paths, pooling=None):
    """What a keras-hub user writes: the preset's ImageConverter on the full decoded photo, then its Backbone."""
    import keras_hub
    converter = keras_hub.layers.ImageConverter.from_preset(str(folder))
    model = keras_hub.models.Backbone.from_preset(str(folder))
    out = []
    for p in paths:
        x = converter(np.asarray(decode_rgb(p)))[None]
        if kind == "dinov2":
            tokens = np.asarray(model({"images": x}))[0]
            out.append(tokens[1 + 4:].mean(axis=0) if pooling == "avg" else tokens[0])  # 4 registers, then patches
        else:
            out.append(np.asarray(model.get_vision_embeddings(x))[0])
    return np.stack(out)


def assert_recipe(summary, data, folder, kind, pooling=None):
    entry = read_entry(summary.jobs[0].writer.final)
    paths = photo_paths(summary, data)
    ref = keras_hub_recipe(folder, kind, [paths[i] for i in entry.ids], pooling)
    assert entry.features.shape == ref.shape and len(entry.ids) == len(paths)
    err = np.linalg.norm(entry.features - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert err.max() <= 1e-4, (kind, err.max())
    return entry


@pytest.mark.parametrize("kind", ["dinov2", "siglip", "clip"])
def test_stored_vectors_equal_keras_hub_recipe(tmp_path, odd_photos, hub_presets, kind):
    folder = hub_presets[kind]
    summary = extract(ExtractConfig(odd_photos, backbones=[f"hub:{folder}"], features_dir=tmp_path / "f",
                                    batch_size=5, progress=False))
    entry = assert_recipe(summary, odd_photos, folder, kind)
    assert entry.attrs["pooling"] == {"dinov2": "token"}.get(kind, "pooled")
    if kind == "dinov2":  # --pooling avg: the mean of the patch tokens, registers and class token left out
        summary = extract(ExtractConfig(odd_photos, backbones=[f"hub:{folder}"], pooling="avg",
                                        features_dir=tmp_path / "f", batch_size=5, progress=False))
        assert_recipe(summary, odd_photos, folder, kind, pooling="avg")


def test_real_photos_equal_keras_hub_recipe(tmp_path, shared_data, hub_presets):
    src = shared_data / "dogs-vs-cats-sample"
    data = tmp_path / "data" / "real"
    for sub, names in (("train", [f"{c}.{n}" for c in ("cat", "dog") for n in range(5)]), ("test1", ["1", "2"])):
        (data / sub).mkdir(parents=True)
        for name in names:
            (data / sub / f"{name}.jpg").symlink_to(src / sub / f"{name}.jpg")
    sizes = {decode_rgb(p).size for p in data.rglob("*.jpg")}
    assert len({w / h for w, h in sizes}) > 3  # real photos of several shapes
    summary = extract(ExtractConfig(data, backbones=[f"hub:{hub_presets['dinov2']}"], features_dir=tmp_path / "f",
                                    batch_size=4, progress=False))
    assert_recipe(summary, data, hub_presets["dinov2"], "dinov2")


def test_entry_names_the_preset_and_hashes_its_files(tmp_path, hub_presets):
    folder = hub_presets["dinov2"]
    b = bb.resolve([f"hub:{folder}"])[0]
    assert b.name == "hub:dinov2" and b.entry.startswith("hub_dinov2_56_token_preset_")
    attrs = b.attrs()
    assert attrs["preset"] == str(folder) and attrs["preset_class"] == "DINOV2Backbone"
    files = __import__("json").loads(attrs["preset_files"])
    assert files["model.weights.h5"] == bb.sha256_of(folder / "model.weights.h5") and "image_converter.json" in files
    moved = tmp_path / "dinov2"
    shutil.copytree(folder, moved)
    assert bb.resolve([f"hub:{moved}"])[0].entry == b.entry  # the same files are the same entry, wherever they are
    (moved / "metadata.json").write_text((moved / "metadata.json").read_text() + " ")
    assert bb.resolve([f"hub:{moved}"])[0].entry != b.entry


def test_kaggle_models_folder_is_named_by_model_and_variant(tmp_path, hub_presets):
    kaggle = tmp_path / "input" / "dinov2" / "keras" / "dinov2_small" / "1"
    shutil.copytree(hub_presets["dinov2"], kaggle)
    assert bb.resolve([f"hub:{kaggle}"])[0].name == "hub:dinov2_dinov2_small_1"


def _offline(*args, **kwargs):
    raise ConnectionError("HTTPSConnectionPool(host='api.kaggle.com', port=443): Failed to resolve 'api.kaggle.com'")


@pytest.mark.parametrize("names, kwargs, match", [
    (["hub:{dinov2}"], {"weights": "random"}, r"--weights random: does not apply to hub:.*dinov2, whose weights"),
    (["hub:{dinov2}"], {"pooling": "pooled"}, r"--pooling pooled: hub:.*dinov2 \(DINOV2Backbone\) gives token"),
    (["hub:{siglip}"], {"pooling": "avg"}, r"--pooling avg: hub:.*siglip \(SigLIPBackbone\) gives pooled"),
    (["resnet50"], {"pooling": "token"}, r"--pooling token: resnet50 pools avg or max"),
    (["hub:{tmp}/nowhere"], {}, r"hub:.*nowhere: no such folder"),
    (["hub:{tmp}"], {}, r"no config.json there; a keras-hub preset folder is what save_to_preset writes"),
    (["hub:"], {}, r"name a keras-hub preset or a preset folder after hub:"),
    (["hub:dinov2_small"], {}, r"hub:dinov2_small: the keras-hub preset 'dinov2_small' cannot be downloaded "
                               r"\(HTTPSConnectionPool.*\)\. Offline, attach it as a folder: .* --backbones "
                               r"hub:/path/to/that/folder"),
])
def test_hub_refusals_are_one_line(tmp_path, hub_presets, monkeypatch, names, kwargs, match):
    from keras_hub.src.utils import preset_utils
    if names == ["hub:dinov2_small"]:  # a preset name, where Kaggle cannot be reached
        monkeypatch.setattr(preset_utils, "get_file", _offline)
    names = [n.format(tmp=tmp_path, **hub_presets) for n in names]
    with pytest.raises(FeatstackError, match=match) as info:
        bb.resolve(names, **kwargs)
    assert "\n" not in str(info.value)


def test_without_keras_hub_the_error_names_the_extra(hub_presets, monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # what `import keras_hub` meets where it is not installed
    with pytest.raises(FeatstackError, match=r'hub: backbones need keras-hub, an optional extra: '
                                             r'pip install "featstack\[hub\]"'):
        bb.resolve([f"hub:{hub_presets['dinov2']}"])


def test_cli_random_weights_with_a_preset_is_one_line(tmp_path, odd_photos, hub_presets):
    proc = subprocess.run([sys.executable, str(ROOT / "extract_features.py"), "--data", str(odd_photos),
                           "--backbones", f"resnet50,hub:{hub_presets['dinov2']}", "--weights", "random",
                           "--features-dir", str(tmp_path / "f"), "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --weights random: does not apply to hub:")
    assert not list((tmp_path / "f").rglob("*.h5")) and not list((tmp_path / "f").rglob("split.csv"))


def test_predict_and_app_answer_a_run_stacking_a_hub_and_a_classic_backbone(tmp_path, odd_photos, hub_presets):
    from fastapi.testclient import TestClient

    from featstack.predict import Predictor
    from featstack.selection import run_select
    from featstack.serve import ServeConfig, create_app
    from featstack.stack import run_stack

    weights = make_weights_dir(tmp_path / "w", ["vgg16"], 32)
    s = extract(ExtractConfig(odd_photos, backbones=[f"hub:{hub_presets['dinov2']}", "vgg16"],
                              weights=str(weights), image_size=32, holdout=0.25, features_dir=tmp_path / "f",
                              batch_size=4, progress=False))
    assert [j.backbone.name for j in s.jobs] == ["hub:dinov2", "vgg16"]
    run = run_stack(s.paths.root, model="stack", folds=2, models_dir=tmp_path / "m")
    run_select(s.paths.root, folds=2, models_dir=tmp_path / "m")  # --select ranks a hub backbone like any other
    holdout = pd.read_csv(run / "holdout_predictions.csv", dtype={"id": str, "label": str})
    classes = list(holdout.columns[2:])
    assert len(holdout) >= 2
    paths = [odd_photos / "train" / f"{i}.jpg" for i in holdout.id]
    predictor = Predictor(run)
    assert [b.name for b in predictor.backbones] == ["hub:dinov2", "vgg16"]
    got = np.stack([p for _, p, _ in predictor.predict([str(p) for p in paths], batch_size=3)])
    np.testing.assert_allclose(got, holdout[classes].to_numpy(), atol=2e-5)
    with TestClient(create_app(ServeConfig(), predictor)) as client:
        r = client.post("/api/predict", files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths])
    assert r.status_code == 200, r.text
    for result, want in zip(r.json()["results"], holdout[classes].to_numpy()):
        probs = {p["class"]: p["probability"] for p in result["predictions"]}
        np.testing.assert_allclose([probs[c] for c in classes], want, atol=2e-5)


def test_ray_engine_stages_carry_a_hub_backbone(tmp_path, odd_photos, hub_presets):
    """The Ray engine's decode task and model actor (run here without a cluster) store what the local engine does."""
    import copy

    from featstack.ray_engine import DecodeBatch, ExtractActor
    s = extract(ExtractConfig(odd_photos, backbones=[f"hub:{hub_presets['siglip']}"], features_dir=tmp_path / "f",
                              progress=False))
    entry = read_entry(s.jobs[0].writer.final)
    paths = photo_paths(s, odd_photos)
    shipped = copy.copy(s.jobs[0].backbone)
    shipped.model = None  # as run_jobs_ray ships it: the actor builds its own
    batch = DecodeBatch((shipped.input_key,))({"id": np.array(entry.ids, dtype=object),
                                               "path": np.array([paths[i] for i in entry.ids], dtype=object)})
    out = ExtractActor([shipped], [set(entry.ids)])(batch)
    err = np.linalg.norm(out["feat0"] - entry.features, axis=1) / np.linalg.norm(entry.features, axis=1)
    assert err.max() < 1e-5


def _other_config(folder, presets):
    import json
    config = json.loads((folder / "config.json").read_text())
    config["config"]["hidden_dim"] = 48  # a config edited after the weights were saved
    (folder / "config.json").write_text(json.dumps(config))


def _other_weights(folder, presets):
    shutil.copy(presets["siglip"] / "model.weights.h5", folder / "model.weights.h5")


def _truncated_weights(folder, presets):
    data = (folder / "model.weights.h5").read_bytes()
    (folder / "model.weights.h5").write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("damage, cause", [
    (_other_config, r"A total of \d+ objects could not be loaded"),
    (_other_weights, r"A total of \d+ objects could not be loaded"),
    (_truncated_weights, r"Unable to synchronously open file \(truncated file"),
])
def test_a_preset_whose_weights_do_not_load_is_one_line(tmp_path, hub_presets, damage, cause):
    """Weights that do not match the config, come from another preset or are truncated: a traceback before."""
    folder = tmp_path / "dinov2"
    shutil.copytree(hub_presets["dinov2"], folder)
    damage(folder, hub_presets)
    backbone = bb.resolve([f"hub:{folder}"])[0]
    with pytest.raises(FeatstackError, match=rf"--backbones hub:{folder}: the preset's weights do not load into the "
                                             rf"model its config\.json describes \({cause}.*\); the weights file is "
                                             r"truncated, damaged or from another preset: restore the folder") as info:
        backbone.build()
    assert "\n" not in str(info.value)
