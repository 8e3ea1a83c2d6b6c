"""Registry of frozen ImageNet backbones: each entry's constructor, input size, preprocessing and width side by side."""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import hub
from .errors import FeatstackError
from .paths import safe_name

# Models built in this process, by configuration: a notebook (or a test) that extracts and then predicts, or extracts
# again, with one configuration builds and compiles it once (resnet50 at 75 px: about 4.5 s on 2 cores). Kept only
# where the identity pins the weights (a seed, or the sha256 of the weights file, model file or preset files).
BUILT_MODELS: OrderedDict = OrderedDict()
BUILT_MODELS_MAX = 8

PREPROCESS_MODES = ("tf", "caffe", "torch", "none")
POOLINGS = ("avg", "max")
TTAS = ("none", "flip")
PRECISIONS = ("float32", "bf16")
MODEL_FILE_SUFFIXES = (".keras", ".h5")


def _mobilenet_v2_file(size: int) -> str:
    rows = size if size in (96, 128, 160, 192, 224) else 224  # the sizes Keras publishes weights for
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"


@dataclass(frozen=True)
class BackboneSpec:
    """The preprocessing facts of one keras.applications model, beside its constructor."""

    constructor: str
    input_size: int
    preprocess: str
    width: int
    weights_file: Callable[[int], str]
    min_size: int = 32


def _notop(stem: str) -> Callable[[int], str]:
    return lambda size: f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5"


def _named(model_name: str) -> Callable[[int], str]:
    return lambda size: f"{model_name}_notop.h5"  # ConvNeXt and EfficientNetV2 name the file after the model


REGISTRY: dict[str, BackboneSpec] = {
    "xception": BackboneSpec("Xception", 299, "tf", 2048, _notop("xception"), min_size=71),
    "inception_v3": BackboneSpec("InceptionV3", 299, "tf", 2048, _notop("inception_v3"), min_size=75),
    "resnet50": BackboneSpec("ResNet50", 224, "caffe", 2048, _notop("resnet50")),
    "vgg16": BackboneSpec("VGG16", 224, "caffe", 512, _notop("vgg16")),
    "mobilenet_v2": BackboneSpec("MobileNetV2", 224, "tf", 1280, _mobilenet_v2_file),
    "inception_resnet_v2": BackboneSpec("InceptionResNetV2", 299, "tf", 1536, _notop("inception_resnet_v2"),
                                        min_size=75),
    "efficientnet_b0": BackboneSpec("EfficientNetB0", 224, "none", 1280, lambda size: "efficientnetb0_notop.h5"),
    "resnet152": BackboneSpec("ResNet152", 224, "caffe", 2048, _notop("resnet152")),
    "nasnet_large": BackboneSpec("NASNetLarge", 331, "tf", 4032, lambda size: "nasnet_large_no_top.h5"),
    # ConvNeXt and EfficientNetV2 normalise inside the model (include_preprocessing=True): they take 0-255 pixels.
    **{f"convnext_{v}": BackboneSpec(f"ConvNeXt{c}", 224, "none", w, _named(f"convnext_{v}"))
       for v, c, w in (("tiny", "Tiny", 768), ("small", "Small", 768), ("base", "Base", 1024),
                       ("large", "Large", 1536), ("xlarge", "XLarge", 2048))},
    **{f"efficientnetv2_{v}": BackboneSpec(f"EfficientNetV2{v.upper()}", size, "none", w,
                                           _named(f"efficientnetv2-{v}"))
       for v, size, w in (("b0", 224, 1280), ("b1", 240, 1280), ("b2", 260, 1408), ("b3", 300, 1536),
                          ("s", 384, 1280), ("m", 480, 1280), ("l", 480, 1280))},
}
DEFAULT_BACKBONES = ("xception", "inception_v3", "resnet50", "vgg16")


def identity_of(attrs: dict) -> dict:
    """The identity (see Backbone.identity) a feature file's recorded attributes describe."""
    ident = {k: attrs.get(k) for k in ("backbone", "input_size", "preprocess", "pooling", "tta", "precision",
                                        "weights")}
    if attrs.get("preset"):
        ident["resize"] = attrs.get("resize")
    if attrs.get("weights") == "random":
        ident["weights_seed"] = attrs.get("weights_seed")
        ident["keras_backend"] = attrs.get("keras_backend")
    elif attrs.get("weights") == "imagenet":
        ident["weights_file"] = Path(str(attrs.get("weights_file"))).name
    else:
        ident["weights_sha256"] = attrs.get("weights_sha256")
    if attrs.get("layer"):
        ident["layer"] = attrs["layer"]
    return ident


def identity_digest(ident: dict) -> str:
    """The digest that ends a cache entry's file name: two identities share a file only if it is equal."""
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]


def keras_cache_dir() -> Path:
    """Where keras.utils.get_file keeps downloaded weights (cache_subdir="models")."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def preprocess(x: np.ndarray, mode: str) -> np.ndarray:
    """keras.applications' preprocess_input for ``mode`` on a float32 batch it may overwrite."""
    if mode == "none":
        return x
    from keras.applications import imagenet_utils
    return imagenet_utils.preprocess_input(x, mode=mode)


def is_model_file(name: str) -> bool:
    return name.split(":")[0].lower().endswith(MODEL_FILE_SUFFIXES)


@dataclass
class Backbone:
    """One backbone configuration, resolved to what makes its features: build it once, feed it uint8 batches."""

    name: str
    input_size: int
    preprocess: str
    pooling: str
    tta: str
    precision: str
    weights: str  # imagenet | random | dir | file | preset
    weights_file: str | None = None  # the file the weights come from, when there is one
    weights_sha256: str | None = None
    seed: int = 0
    model_path: str | None = None  # a user's saved Keras model
    layer: str | None = None
    width: int | None = None
    batch_rows: int | None = None  # shorter batches are padded to this many rows (see features)
    preset: str | None = None  # a keras-hub preset (name or folder), as given after hub:
    hub_facts: hub.PresetFacts | None = field(default=None, repr=False)
    registers: int = 0  # register tokens of a hub ViT, left out of patch pooling
    imagenet_files: tuple[str, ...] = ()  # every ImageNet file of the run, so a failed download names all missing
    model: object = field(default=None, repr=False)

    @property
    def input_key(self):
        """What the decoder makes for this backbone: a square size, or a hub preset's own resize."""
        return self.hub_facts.resize if self.hub_facts else self.input_size

    @property
    def spec(self) -> BackboneSpec | None:
        return REGISTRY.get(self.name) if self.model_path is None else None

    def identity(self) -> dict:
        """Everything that changes the vectors; two configurations share a cache entry only if this is equal."""
        import keras
        return identity_of({
            "backbone": self.name, "input_size": self.input_size, "preprocess": self.preprocess,
            "pooling": self.pooling, "tta": self.tta, "precision": self.precision, "weights": self.weights,
            "preset": self.preset, "resize": str(self.hub_facts.resize) if self.preset else None,
            "weights_seed": self.seed, "keras_backend": keras.backend.backend(),  # each backend draws its own
            "weights_file": self.weights_file, "weights_sha256": self.weights_sha256, "layer": self.layer})

    @property
    def entry(self) -> str:
        """The cache entry's file stem: readable parts, then a digest of the whole identity."""
        digest = identity_digest(self.identity())
        tag = {"random": f"random{self.seed}"}.get(self.weights, self.weights)
        tta = "_flip" if self.tta == "flip" else ""
        return f"{safe_name(self.name)}_{self.input_size}_{self.pooling}{tta}_{tag}_{digest}"

    def attrs(self) -> dict:
        """What the feature file records about how it was made."""
        import keras
        if self.weights == "imagenet" and self.weights_sha256 is None and Path(self.weights_file).is_file():
            self.weights_sha256 = sha256_of(self.weights_file)  # downloaded during this run
        out = {**self.identity(), "keras_version": keras.__version__, "keras_backend": keras.backend.backend(),
               "weights_file": self.weights_file or "", "weights_sha256": self.weights_sha256 or "",
               "model_path": self.model_path or "", "width": int(self.width or 0)}
        if self.preset:
            out |= {"preset": self.preset, "preset_class": self.hub_facts.class_name,
                    "preset_files": json.dumps(self.hub_facts.files, sort_keys=True)}
        return out

    def _built_key(self) -> tuple | None:
        if self.weights != "random" and not self.weights_sha256:
            return None  # ImageNet weights not yet downloaded: nothing pins them
        return identity_digest(self.identity()), self.model_path

    def build(self) -> None:
        """Construct the frozen model once (download or load weights here); once per process per configuration."""
        if self.model is not None:
            return
        key = self._built_key()
        if key in BUILT_MODELS:
            BUILT_MODELS.move_to_end(key)
            self.model, self.registers, self.input_size = BUILT_MODELS[key]
        else:
            self._build()
            if key is not None:
                BUILT_MODELS[key] = (self.model, self.registers, self.input_size)
                while len(BUILT_MODELS) > BUILT_MODELS_MAX:
                    BUILT_MODELS.popitem(last=False)
        self.width = int(self.model.output_shape[-1])

    def _build(self) -> None:
        import keras
        policy = keras.config.dtype_policy()
        if self.precision == "bf16":
            keras.config.set_dtype_policy("mixed_bfloat16")
        try:
            if self.preset:
                self.model, self.registers = hub.build_model(self.hub_facts.folder, self.hub_facts.class_name,
                                                             "mixed_bfloat16" if self.precision == "bf16" else None)
            else:
                self.model = self._load_model_file() if self.model_path else self._construct()
        finally:
            keras.config.set_dtype_policy(policy)

    def _construct(self):
        import keras
        constructor = getattr(keras.applications, self.spec.constructor)
        kwargs = dict(include_top=False, input_shape=(self.input_size, self.input_size, 3), pooling=self.pooling)
        if self.weights == "random":
            keras.utils.set_random_seed(self.seed)
            return constructor(weights=None, **kwargs)
        if self.weights == "imagenet":
            try:
                return constructor(weights="imagenet", **kwargs)
            except Exception as exc:
                raise FeatstackError(self._imagenet_missing_message(exc)) from None
        try:
            return constructor(weights=self.weights_file, **kwargs)
        except Exception as exc:  # a truncated or damaged file fails inside h5py or Keras in many ways
            cause = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            raise FeatstackError(
                f"--weights {Path(self.weights_file).parent}: {Path(self.weights_file).name} cannot be loaded for "
                f"{self.name} ({cause}); it is damaged or truncated: put an intact copy of Keras's file there"
            ) from None

    def _imagenet_missing_message(self, exc: Exception) -> str:
        """Every weight file the run lacks (not only this backbone's), where they go, and the two ways on."""
        cause = (str(exc).splitlines() or [type(exc).__name__])[0]
        cause = cause.rsplit(" -- ", 1)[-1][:160]  # Keras: "URL fetch failure on <url>: None -- [Errno -2] ..."
        cache = keras_cache_dir()
        missing = [f for f in dict.fromkeys((*self.imagenet_files, Path(self.weights_file).name))
                   if not (cache / f).is_file()]
        what = (f"{len(missing)} weight file{'s' if len(missing) > 1 else ''} missing from {cache} (Keras's cache): "
                f"{', '.join(missing)}" if missing else
                f"{Path(self.weights_file).name} in {cache} (Keras's cache) is damaged")
        return (f"ImageNet weights for {self.name} cannot be downloaded ({cause}); {what}. Put "
                f"{'them' if len(missing) > 1 else 'it'} there or in a folder you pass with --weights DIR, or run "
                "with --weights random (seeded random weights: a trial run, scores far below ImageNet ones)")

    def _load_model_file(self):
        import keras
        try:
            full = keras.models.load_model(self.model_path, compile=False)
        except Exception as exc:
            raise FeatstackError(f"backbone {self.model_path}: cannot load it as a Keras model "
                                 f"({str(exc)[:200]})") from None
        if self.layer:
            try:
                layer = full.get_layer(self.layer)
            except ValueError:
                names = ", ".join(l.name for l in full.layers[-8:])
                raise FeatstackError(f"backbone {self.model_path}: no layer {self.layer!r}; "
                                     f"last layers: {names}") from None
        else:
            pools = [l for l in full.layers
                     if type(l).__name__.startswith(("GlobalAveragePooling", "GlobalMaxPooling"))]
            if not pools:
                raise FeatstackError(f"backbone {self.model_path}: no global-pooling layer; name the feature layer "
                                     "as PATH:LAYER_NAME")
            layer = pools[-1]
        model = keras.Model(full.inputs, layer.output)
        shape = model.input_shape
        if shape[1] is not None:
            self.input_size = int(shape[1])
        return model

    def features(self, images: np.ndarray) -> np.ndarray:
        """float32 (n, width) features of a decoded (n, h, w, 3) batch (uint8; float32 from a hub preset's resize)."""
        n = len(images)
        rows = max(n, self.batch_rows or 0)
        x = self._preprocess(images)
        if rows > n:
            # One input shape per model: JAX (and XLA on TensorFlow GPUs) compile each new shape again, which
            # costs seconds a model on a GPU; zero rows pass through inference alone, without touching real rows.
            x = np.concatenate([x, np.zeros((rows - n, *x.shape[1:]), np.float32)])
        if self.tta == "flip":
            x = np.concatenate([x, x[:, :, ::-1]])
        out = np.asarray(self.model.predict_on_batch(x), dtype=np.float32)
        if self.preset:
            out = hub.readout(out, self.pooling, self.registers)
        if self.tta == "flip":
            out = (out[:rows] + out[rows:]) * 0.5  # flipped views are averaged, so the width stays that of the backbone
        return out[:n].reshape(n, -1)

    def _preprocess(self, images: np.ndarray) -> np.ndarray:
        if not self.preset:
            return preprocess(images.astype(np.float32), self.preprocess)  # a copy: preprocess_input works in place
        x = images.astype(np.float32)  # the converter's rescale, after its resize (done by the decoder)
        for value, combine in ((self.hub_facts.scale, np.multiply), (self.hub_facts.offset, np.add)):
            if value is not None:
                x = combine(x, np.asarray(value, np.float32), dtype=np.float32)
        return x


def run_backbones(backbones: list[Backbone], arrays: dict[int, np.ndarray],
                  wanted: list[np.ndarray | None] | None = None,
                  starting: Callable[[Backbone], None] | None = None) -> tuple[list[np.ndarray | None], list[float]]:
    """Every backbone's features of one decoded batch: the one loop the local engine, Ray actors and Predictor share.

    ``arrays`` is decode_batch's ``{input_key: (n, height, width, 3)}``; ``wanted[k]`` is a boolean mask of the rows
    backbone ``k`` needs (None: all); ``starting(backbone)`` is called before each backbone's forward pass (progress:
    one slow backbone can take a minute per batch on a loaded machine). Returns, per backbone, float32 features of
    its wanted rows (None when it wants none), and the seconds its forward passes took.
    """
    import time
    feats: list[np.ndarray | None] = []
    seconds: list[float] = []
    for k, b in enumerate(backbones):
        images = arrays[b.input_key]
        mask = wanted[k] if wanted is not None else None
        if mask is not None and not mask.all():
            images = images[mask]
        if not len(images):
            feats.append(None)
            seconds.append(0.0)
            continue
        if starting is not None:
            starting(b)
        t0 = time.perf_counter()
        feats.append(b.features(images))
        seconds.append(time.perf_counter() - t0)
    return feats, seconds


def resolve(names: list[str], *, weights: str = "imagenet", image_size: int | None = None, pooling: str | None = None,
            tta: str = "none", preprocess_mode: str | None = None, precision: str = "float32",
            seed: int = 0) -> list[Backbone]:
    """Backbone configurations for command-line names; unknown names list the valid ones."""
    if pooling is not None and pooling not in (*POOLINGS, *hub.POOLINGS):
        raise FeatstackError(f"--pooling {pooling}: choose one of avg, max (hub: encoders: also token, pooled)")
    for option, value, valid in (("--tta", tta, TTAS), ("--precision", precision, PRECISIONS)):
        if value not in valid:
            raise FeatstackError(f"{option} {value}: choose one of {', '.join(valid)}")
    if preprocess_mode is not None and preprocess_mode not in PREPROCESS_MODES[:3]:
        raise FeatstackError(f"--preprocess {preprocess_mode}: choose one of tf, caffe, torch")
    if not names:
        raise FeatstackError("--backbones: name at least one backbone")
    if len(set(names)) != len(names):
        raise FeatstackError(f"--backbones {','.join(names)}: a backbone is named twice")
    out = []
    for name in names:
        if hub.is_hub(name):
            out.append(_hub_backbone(name.removeprefix(hub.PREFIX), weights, pooling, tta, precision, seed))
            continue
        if pooling not in (None, *POOLINGS):
            raise FeatstackError(f"--pooling {pooling}: {name} pools avg or max ({pooling} is for hub: encoders)")
        pooling_ = pooling or "avg"
        if is_model_file(name):
            out.append(_model_file_backbone(name, image_size, pooling_, tta, preprocess_mode, precision, seed))
            continue
        spec = REGISTRY.get(name)
        if spec is None:
            raise FeatstackError(f"--backbones: unknown backbone {name!r}; valid: {', '.join(REGISTRY)} "
                                 "or a path to a .keras/.h5 model file")
        size = image_size or spec.input_size
        if size < spec.min_size:
            raise FeatstackError(f"--image-size {size}: {name} needs at least {spec.min_size} px")
        b = Backbone(name=name, input_size=size, preprocess=spec.preprocess, pooling=pooling_, tta=tta,
                     precision=precision, weights=weights, seed=seed, width=spec.width)
        _resolve_weights(b, spec.weights_file(size))
        out.append(b)
    files = tuple(Path(b.weights_file).name for b in out if b.weights == "imagenet")
    for b in out:
        b.imagenet_files = files
    return out


def _hub_backbone(preset: str, weights: str, pooling: str | None, tta: str, precision: str, seed: int) -> Backbone:
    """A keras-hub preset: its converter decides size and normalisation; its files are its weights' identity."""
    if weights == "random":
        raise FeatstackError(f"--weights random: does not apply to hub:{preset}, whose weights are the preset's own; "
                             "drop --weights random (or extract the hub backbone in a run of its own)")
    if not preset:
        raise FeatstackError("--backbones hub:: name a keras-hub preset or a preset folder after hub:")
    facts = hub.read_preset(preset)
    pooling = pooling or hub.default_pooling(facts.class_name)
    hub.check_pooling(preset, facts.class_name, pooling)
    return Backbone(name=hub.short_name(preset), input_size=facts.resize.height, preprocess="hub", pooling=pooling,
                    tta=tta, precision=precision, weights="preset", weights_file=str(facts.folder),
                    weights_sha256=hub.digest(facts.files), seed=seed, preset=preset, hub_facts=facts)


def _resolve_weights(b: Backbone, canonical: str) -> None:
    if b.weights == "random":
        return
    if b.weights == "imagenet":
        b.weights_file = str(keras_cache_dir() / canonical)
        if Path(b.weights_file).is_file():
            b.weights_sha256 = sha256_of(b.weights_file)
        return
    folder = Path(b.weights)
    if not folder.is_dir():
        raise FeatstackError(f"--weights {b.weights}: not imagenet, random, or an existing folder")
    path = folder / canonical
    if not path.is_file():
        raise FeatstackError(f"--weights {folder}: no {canonical} there for {b.name}; put Keras's file of that name "
                             f"in {folder} or in {keras_cache_dir()} and use --weights imagenet")
    b.weights, b.weights_file, b.weights_sha256 = "dir", str(path.resolve()), sha256_of(path)


def _model_file_backbone(name, image_size, pooling, tta, preprocess_mode, precision, seed) -> Backbone:
    path, _, layer = name.partition(":")
    if not Path(path).is_file():
        raise FeatstackError(f"--backbones: model file {path} not found")
    if preprocess_mode is None:
        raise FeatstackError(f"--backbones {name}: a model-file backbone needs --preprocess tf|caffe|torch "
                             "(the preprocessing it was trained with)")
    stem = Path(path).stem + (f"-{layer}" if layer else "")
    b = Backbone(name=stem, input_size=image_size or 224, preprocess=preprocess_mode, pooling=pooling, tta=tta,
                 precision=precision, weights="file", weights_file=str(Path(path).resolve()),
                 weights_sha256=sha256_of(path), seed=seed, model_path=str(Path(path).resolve()), layer=layer or None)
    if image_size is None:
        b.build()  # the input size comes from the model itself
    return b
