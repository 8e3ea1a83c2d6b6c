"""The GPU path's fixed batch shape (issue #15), and the GPU benchmark's generated dog-breed data."""
import sys
from pathlib import Path

import numpy as np
import pytest

from featstack import backbones as bb
from featstack.extract import ExtractConfig, extract
from featstack.layouts import read_layout
from featstack.store import read_entry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))


@pytest.fixture
def model_shapes(monkeypatch):
    """Every input shape that reaches a Keras model's predict_on_batch (the real call still runs)."""
    import keras
    seen = []
    real = keras.Model.predict_on_batch

    def spy(self, x):
        seen.append(tuple(np.shape(x)))
        return real(self, x)

    monkeypatch.setattr(keras.Model, "predict_on_batch", spy)
    return seen


def relative_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_short_batch_is_padded_to_one_shape_without_changing_its_features(tta, model_shapes):
    b, = bb.resolve(["resnet50"], weights="random", image_size=32, tta=tta)
    b.build()
    images = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    unpadded = b.features(images[4:])
    assert model_shapes[-1][0] == (6 if tta == "flip" else 3)
    b.batch_rows = 4
    model_shapes.clear()
    full, short = b.features(images[:4]), b.features(images[4:])
    rows = 8 if tta == "flip" else 4
    assert model_shapes == [(rows, 32, 32, 3)] * 2  # one shape: a compiling backend compiles the model once
    assert full.shape == (4, 2048) and short.shape == (3, 2048)
    assert relative_error(short, unpadded) < 1e-5  # float32 noise only: padding rows never touch real ones


def test_extract_feeds_one_batch_shape_and_stores_what_one_big_batch_stores(tmp_path, cats_dogs, model_shapes):
    common = dict(backbones=["vgg16"], weights="random", image_size=32, progress=False)
    one_batch = extract(ExtractConfig(cats_dogs, features_dir=tmp_path / "a", batch_size=16, **common))  # 16 images
    model_shapes.clear()
    # 5, 5, 5, then 1 padded to 5
    padded = extract(ExtractConfig(cats_dogs, features_dir=tmp_path / "b", batch_size=5, **common))
    # One warm-up pass of zeros at build (its compile said in the model's line), then 4 batches, all one shape.
    assert set(model_shapes) == {(5, 32, 32, 3)} and len(model_shapes) == 1 + 4
    a, b = read_entry(one_batch.jobs[0].writer.final), read_entry(padded.jobs[0].writer.final)
    assert sorted(a.ids) == sorted(b.ids) and len(b.ids) == 16
    order = {i: k for k, i in enumerate(a.ids)}
    assert relative_error(b.features, a.features[[order[i] for i in b.ids]]) < 1e-5


def test_generated_benchmark_data_is_a_dog_breed_dataset_of_photo_sized_jpegs(tmp_path):
    from bench_gpu import generate
    info = generate(tmp_path / "data", n=9, workers=1)
    table, layout = read_layout(tmp_path / "data")
    assert layout == "dog-breed" and len(table) == 9
    assert table.split.eq("test").sum() == info["test"] == 5 and table.label.notna().sum() == info["train"] == 4
    from PIL import Image
    sizes = [Image.open(p).size for p in table.path]
    assert all(max(s) <= 500 and min(s) >= 150 for s in sizes)
    pixels = np.asarray(Image.open(table.path.iloc[0]), dtype=np.float32)
    assert pixels.std(axis=(0, 1)).min() > 10  # varied content, not a flat colour
    assert info["mean_kib"] > 10


def test_every_registry_backbone_is_in_the_benchmark_with_its_timm_twin():
    """The GPU benchmark measures the defaults, and with --optional every newer registry entry (issue 22)."""
    from bench_gpu import BACKBONES, OPTIONAL_BACKBONES, TIMM_NAMES
    older = {"mobilenet_v2", "inception_resnet_v2", "efficientnet_b0"}  # not benchmarked: no issue asked for them
    assert set(BACKBONES) | set(OPTIONAL_BACKBONES) == set(bb.REGISTRY) - older
    assert set(TIMM_NAMES) == set(BACKBONES) | set(OPTIONAL_BACKBONES)
