"""The registry's facts hold for every entry, and stored vectors equal the plain Keras recipe."""
import numpy as np
import pandas as pd
import pytest

from featstack import backbones as bb
from featstack.errors import FeatstackError
from featstack.extract import ExtractConfig, extract
from featstack.store import read_entry

from conftest import make_weights_dir

SIZE = 75


# Entries the parity test below builds are not built again here; the largest (ConvNeXt-XL, EfficientNetV2-L,
# NASNetLarge, 5-70 s a build on 2 cores) are covered by the build-free facts below.
PARITY = [*bb.DEFAULT_BACKBONES, "efficientnetv2_b0"]
BUILT = ["mobilenet_v2", "inception_resnet_v2", "efficientnet_b0", "convnext_tiny"]


@pytest.mark.parametrize("name", BUILT)
def test_registry_width(name):
    b = bb.resolve([name], weights="random", image_size=max(SIZE, bb.REGISTRY[name].min_size))[0]
    b.build()
    assert b.width == bb.REGISTRY[name].width


def test_a_configuration_is_built_once_per_process_and_only_while_its_weights_are_the_same(tmp_path):
    """A second build of one configuration reuses the model (a notebook that extracts, then predicts); another seed
    or another weights file under the same name is a model of its own."""
    def built(**kwargs):
        b = bb.resolve(["vgg16"], image_size=32, **kwargs)[0]
        b.build()
        return b

    first = built(weights="random")
    assert built(weights="random").model is first.model
    assert built(weights="random", seed=1).model is not first.model
    wdir = make_weights_dir(tmp_path / "w", ["vgg16"], 32)
    from_file = built(weights=str(wdir))
    assert built(weights=str(wdir)).model is from_file.model
    other = make_weights_dir(tmp_path / "other", ["vgg16"], 32, seed=2000)  # another seed, the same file name
    (wdir / bb.REGISTRY["vgg16"].weights_file(32)).write_bytes((other / bb.REGISTRY["vgg16"].weights_file(32))
                                                                .read_bytes())
    changed = built(weights=str(wdir))
    assert changed.model is not from_file.model
    x = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3)).astype(np.uint8)
    assert not np.allclose(changed.features(x), from_file.features(x))


@pytest.mark.parametrize("name", list(bb.REGISTRY))
def test_registry_preprocess_and_weights_file_are_keras_own(name):
    """Each entry's preprocessing is its keras.applications module's preprocess_input, and its weights file is the
    name Keras downloads (ConvNeXt and EfficientNetV2 name it after the model: the constructor's default name)."""
    import inspect

    import keras
    spec = bb.REGISTRY[name]
    constructor = getattr(keras.applications, spec.constructor)
    module = {"tf": "xception", "caffe": "resnet50", "none": "efficientnet"}[spec.preprocess]
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    expected = getattr(keras.applications, module).preprocess_input(x.copy())
    assert np.allclose(bb.preprocess(x.copy(), spec.preprocess), expected)
    source = inspect.getsource(inspect.getmodule(constructor))
    if name.startswith(("convnext_", "efficientnetv2_")):
        assert "_notop.h5" in source and "include_preprocessing=True" in source
        default_name = inspect.signature(constructor).parameters["name"].default
        assert spec.weights_file(spec.input_size) == f"{default_name}_notop.h5"
    elif name == "resnet152":
        assert '"resnet152"' in inspect.getsource(constructor)
        assert spec.weights_file(224) == "resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5"
        assert '{weights_name}_weights_tf_dim_ordering_tf_kernels_notop.h5' in source
    elif name == "nasnet_large":
        assert '"nasnet_large_no_top.h5"' in source


@pytest.mark.parametrize("names, kwargs, match", [
    (["resnet5"], {}, r"unknown backbone 'resnet5'; valid: xception, inception_v3, resnet50, vgg16, mobilenet_v2"),
    (["vgg16", "vgg16"], {}, "named twice"),
    (["xception"], {"image_size": 64}, r"--image-size 64: xception needs at least 71 px"),
    (["vgg16"], {"pooling": "mean"}, r"--pooling mean: choose one of avg, max"),
    (["vgg16"], {"weights": "/no/such/dir"}, r"--weights /no/such/dir: not imagenet, random, or an existing folder"),
    (["missing.keras"], {}, r"model file missing.keras not found"),
    (["vgg16"], {"image_size": 0}, r"--image-size 0: vgg16 needs at least 32 px"),
    (["missing.keras"], {"image_size": -1}, r"--image-size -1: give a positive whole number of pixels"),
])
def test_bad_backbone_options(names, kwargs, match):
    with pytest.raises(FeatstackError, match=match):
        bb.resolve(names, **kwargs)


def test_weights_dir_without_the_file_names_it(tmp_path):
    with pytest.raises(FeatstackError, match=r"no resnet50_weights_tf_dim_ordering_tf_kernels_notop\.h5 there"):
        bb.resolve(["resnet50"], weights=str(tmp_path))


def test_imagenet_unavailable_names_every_missing_file_folder_and_ways_on(monkeypatch, dog_breed, tmp_path, capsys):
    # Offline, default weights and backbones: the one line names each missing file with the folder, not only the
    # first backbone's, leaves out the file already there, and offers --weights DIR and --weights random.
    import os

    import keras

    from featstack.commands import extract as extract_command

    def offline(*a, **k):
        raise Exception("URL fetch failure: [Errno -2] Name or service not known")
    monkeypatch.setattr(keras.src.utils.file_utils, "urlretrieve", offline)
    cache = bb.keras_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    present = bb.REGISTRY["resnet50"].weights_file(224)
    (cache / present).write_bytes(b"already downloaded")
    try:
        with pytest.raises(SystemExit) as exited:
            extract_command.main(["--data", str(dog_breed), "--features-dir", str(tmp_path / "features")])
    finally:
        os.remove(cache / present)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    missing = [bb.REGISTRY[n].weights_file(bb.REGISTRY[n].input_size) for n in bb.DEFAULT_BACKBONES if n != "resnet50"]
    assert f"3 weight files missing from {cache} (Keras's cache): {', '.join(missing)}." in err
    assert present not in err
    assert "--weights DIR" in err and "--weights random" in err and "Name or service not known" in err


def keras_reference(name, model, paths, size):
    """What a user would write by hand: load_img -> img_to_array -> preprocess_input -> the Keras model (the very
    model, pooling='avg', that wrote the weights file featstack loads)."""
    import keras
    modules = {"xception": "xception", "inception_v3": "inception_v3", "resnet50": "resnet50", "vgg16": "vgg16",
               "efficientnetv2_b0": "efficientnet_v2"}
    app = getattr(keras.applications, modules[name])
    x = np.stack([keras.utils.img_to_array(keras.utils.load_img(p, target_size=(size, size), interpolation="bilinear"))
                  for p in paths])
    x = app.preprocess_input(x)
    if keras.backend.backend() == "jax":
        return model.predict(x, verbose=0)  # compiled once: quicker than JAX's op-by-op eager call
    # Eagerly, the same numbers as model.predict without TensorFlow tracing a predict function per model.
    return keras.ops.convert_to_numpy(model(x, training=False))


@pytest.mark.slow
def test_reference_semantics_every_parity_backbone(tmp_path, cats_dogs):
    names = PARITY
    models = {}
    wdir = make_weights_dir(tmp_path / "weights", names, SIZE, models)
    summary = extract(ExtractConfig(cats_dogs, backbones=names, weights=str(wdir), image_size=SIZE,
                                    features_dir=tmp_path / "features", batch_size=5, progress=False))
    table = pd.read_csv(summary.paths.split_csv, dtype=str)
    paths = {i: str(cats_dogs / ("test1" if s == "test" else "train") / f"{i}.jpg")
             for i, s in zip(table.id, table.split)}
    for job in summary.jobs:
        entry = read_entry(job.writer.final)
        assert entry.attrs["weights"] == "dir" and len(entry.attrs["weights_sha256"]) == 64
        assert entry.attrs["width"] == bb.REGISTRY[job.backbone.name].width
        ref = keras_reference(job.backbone.name, models[job.backbone.name], [paths[i] for i in entry.ids], SIZE)
        err = np.linalg.norm(entry.features - ref, axis=1) / np.linalg.norm(ref, axis=1)
        assert err.max() <= 1e-4, (job.backbone.name, err.max())


def test_model_file_backbone_uses_its_pooling_layer(tmp_path, cats_dogs):
    import keras
    keras.utils.set_random_seed(3)
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(64, 64, 3), pooling="avg")
    head = keras.layers.Dense(2, activation="softmax", name="head")(base.output)
    model = keras.Model(base.input, head)
    path = tmp_path / "finetuned.keras"
    model.save(path)
    with pytest.raises(FeatstackError, match="needs --preprocess"):
        bb.resolve([str(path)])
    summary = extract(ExtractConfig(cats_dogs, backbones=[str(path)], preprocess="tf", features_dir=tmp_path / "f",
                                    progress=False))
    entry = read_entry(summary.jobs[0].writer.final)
    assert entry.features.shape == (16, 1280) and entry.attrs["input_size"] == 64
    img = keras.utils.img_to_array(keras.utils.load_img(cats_dogs / "train" / f"{entry.ids[0]}.jpg",
                                                        target_size=(64, 64), interpolation="bilinear"))
    ref = keras.ops.convert_to_numpy(base(keras.applications.mobilenet_v2.preprocess_input(img[None]),
                                          training=False))[0]
    assert np.linalg.norm(entry.features[0] - ref) / np.linalg.norm(ref) < 1e-4


def transfer_learning_model(path, head_pool: str = "avg"):
    """The Keras transfer-learning recipe on a tiny random base: outer rescaling, then the base called as a layer,
    then the head's global pooling and classifier; saved to ``path``. Returns the base (for references)."""
    import keras
    keras.utils.set_random_seed(5)
    i = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, name="stem")(i)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    x = keras.layers.Conv2D(12, 3, activation="relu", name="top_conv")(x)
    base = keras.Model(i, x, name="tinybase")
    inputs = keras.Input((40, 40, 3))
    x = keras.layers.Rescaling(2.0, name="outer_scale")(inputs)
    x = base(x, training=False)
    pool = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}[head_pool]
    x = pool(name="head_pool")(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="head")(x)
    keras.Model(inputs, outputs).save(path)
    return base


def images_as_extracted(folder, ids, size):
    import keras
    return np.stack([keras.utils.img_to_array(keras.utils.load_img(folder / f"{i}.jpg", target_size=(size, size),
                                                                    interpolation="bilinear")) for i in ids])


def test_nested_base_layer_of_a_model_file_is_pooled_as_asked_and_recorded(tmp_path, cats_dogs, capsys):
    """`--backbones model.h5:BASE --pooling max` on a transfer-learning model file: the base's feature map through
    the model's own outer layers, max-pooled by Keras's GlobalMaxPooling2D, recorded as max; avg is another entry."""
    import keras

    from featstack.commands.extract import main as extract_main

    from conftest import run_main
    path = tmp_path / "transfer.h5"
    base = transfer_learning_model(path)
    common = ["--data", cats_dogs, "--features-dir", tmp_path / "f", "--preprocess", "tf", "--no-progress"]
    code, _, err = run_main(extract_main, [*common, "--backbones", f"{path}:tinybase", "--pooling", "max"], capsys)
    assert code == 0, err
    (max_file,) = (tmp_path / "f" / "catsdogs").glob("*.h5")
    entry = read_entry(max_file)
    assert entry.attrs["pooling"] == "max" and entry.attrs["layer"] == "tinybase" and entry.attrs["width"] == 12
    x = keras.applications.imagenet_utils.preprocess_input(images_as_extracted(cats_dogs / "train", entry.ids[:4], 40),
                                                            mode="tf")
    ref = keras.ops.convert_to_numpy(keras.layers.GlobalMaxPooling2D()(base(x * 2.0, training=False)))
    np.testing.assert_allclose(entry.features[:4], ref, rtol=1e-5, atol=1e-5)

    # avg of the same layer is another cache entry, with its own vectors
    code, _, err = run_main(extract_main, [*common, "--backbones", f"{path}:tinybase", "--pooling", "avg"], capsys)
    assert code == 0, err
    (avg_file,) = set((tmp_path / "f" / "catsdogs").glob("*.h5")) - {max_file}
    avg = read_entry(avg_file)
    assert avg.attrs["pooling"] == "avg" and list(avg.ids) == list(entry.ids)
    ref = keras.ops.convert_to_numpy(keras.layers.GlobalAveragePooling2D()(base(x * 2.0, training=False)))
    np.testing.assert_allclose(avg.features[:4], ref, rtol=1e-5, atol=1e-5)

    # Two poolings chosen by --pooling are refused together (named, never one silently dropped); the model's own
    # vector layer stacks beside a pooled layer, whatever it records
    from featstack.features import load_features
    store = tmp_path / "f" / "catsdogs"
    with pytest.raises(FeatstackError, match=r"two configurations of transfer-tinybase; stack one of them"):
        load_features(store, [max_file.stem, avg_file.stem])
    code, _, err = run_main(extract_main, [*common, "--backbones", f"{path}:head"], capsys)
    assert code == 0, err
    (head_file,) = set(store.glob("*.h5")) - {max_file, avg_file}
    assert read_entry(head_file).attrs["pooling"] == "none"
    assert len(load_features(store, [max_file.stem, head_file.stem]).blocks) == 2


def test_model_file_pooling_is_what_is_done_or_refused(tmp_path):
    """The default layer's pooling is the model's own (a max-pooling head is recorded as max); a --pooling that the
    named layer cannot do is one line naming the way on; a wrong name lists the nested layers too."""
    import keras
    path = tmp_path / "maxhead.keras"
    transfer_learning_model(path, head_pool="max")
    own = bb.resolve([str(path)], preprocess_mode="tf")[0]
    assert (own.pooling, own.width, own.input_size) == ("max", 12, 40)
    assert bb.resolve([str(path)], preprocess_mode="tf", pooling="max")[0].entry == own.entry
    refusal = (r"--pooling avg: .*maxhead.keras \(its layer 'head_pool' by default\) already max-pools; "
               r".*--backbones .*maxhead.keras:tinybase --pooling avg")
    with pytest.raises(FeatstackError, match=refusal):
        bb.resolve([str(path)], preprocess_mode="tf", pooling="avg")
    head = bb.resolve([f"{path}:head"], preprocess_mode="tf")[0]
    assert head.pooling == "none" and head.width == 2
    with pytest.raises(FeatstackError, match=r"--pooling max: .*:head gives vectors \(width 2\), not a feature map"):
        bb.resolve([f"{path}:head"], preprocess_mode="tf", pooling="max")
    with pytest.raises(FeatstackError, match=r"no layer 'nope'; reachable layers: .*tinybase/stem_relu, "
                                             r"tinybase/top_conv, head_pool, head$"):
        bb.resolve([f"{path}:nope"], preprocess_mode="tf")
    # A Sequential transfer-learning model reaches its base's layers in the same way
    seq = tmp_path / "seq.h5"
    keras.Sequential([keras.Input((40, 40, 3)), keras.models.load_model(path).get_layer("tinybase"),
                      keras.layers.GlobalAveragePooling2D()]).save(seq)
    for name in (f"{seq}:tinybase/stem_relu", f"{seq}:stem_relu"):
        b = bb.resolve([name], preprocess_mode="tf", pooling="max")[0]
        assert (b.pooling, b.readout, b.width) == ("max", "pooled", 8)
    # An inner name that two nested models share is named by its path
    twins = tmp_path / "twins.keras"
    inputs = keras.Input((40, 40, 3))
    outputs = [keras.Sequential([keras.Input((40, 40, 3)), keras.layers.Conv2D(2, 3, name="conv")], name=n)(inputs)
               for n in ("left", "right")]
    keras.Model(inputs, keras.layers.Concatenate()(outputs)).save(twins)
    with pytest.raises(FeatstackError, match=r"layer 'conv' is in several nested models; name one of left/conv, "
                                             r"right/conv$"):
        bb.resolve([f"{twins}:conv"], preprocess_mode="tf")
    assert bb.resolve([f"{twins}:right/conv"], preprocess_mode="tf")[0].width == 2


def test_a_model_file_backbone_is_rebuilt_from_its_feature_file_attributes(tmp_path):
    """predict.py rebuilds each backbone from what its feature file records: the same vectors, and for a file made
    before the readout was recorded (whose pooling could misstate it), the vectors that file holds."""
    from featstack.predict import backbone_from_attrs
    path = tmp_path / "maxhead.keras"
    transfer_learning_model(path, head_pool="max")
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    for name, pooling, legacy in ((str(path), None, "avg"), (f"{path}:tinybase", "max", None),
                                  (f"{path}:head", None, "avg")):
        made = bb.resolve([name], preprocess_mode="tf", pooling=pooling)[0]
        attrs = made.attrs()
        assert attrs["readout"] in ("layer", "pooled") and attrs["pooling"] == made.pooling != ""
        again = backbone_from_attrs(attrs)
        again.build()
        assert (again.pooling, again.readout) == (made.pooling, made.readout)
        np.testing.assert_array_equal(again.features(images), made.features(images))
        if legacy:
            old = backbone_from_attrs({**{k: v for k, v in attrs.items() if k != "readout"}, "pooling": legacy})
            old.build()
            assert old.pooling == legacy and old.readout is None
            np.testing.assert_array_equal(old.features(images), made.features(images))
