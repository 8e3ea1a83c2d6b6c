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
# A model file's layer that already gives vectors (a Dense or Flatten output): recorded as pooled by nothing.
NO_POOLING = "none"
ASK = "ask"  # a model file's readout before it is loaded: decided by its layer and --pooling
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
    if attrs.get("readout"):  # model files only: entries made before it was recorded may misstate their pooling
        ident["readout"] = attrs["readout"]
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
    # A model file's: "layer" (the layer's own output, a vector or the model's own global pooling) or "pooled"
    # (its feature map pooled here with ``pooling``); decided when the file is loaded, as is ``pooling``.
    readout: str | None = None
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
            "weights_file": self.weights_file, "weights_sha256": self.weights_sha256, "layer": self.layer,
            "readout": self.readout})

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
        if key in BUILT_MODELS and self.width and BUILT_MODELS[key][0].output_shape[-1] != self.width:
            key = None  # a model file's old feature file (flattened map) beside a new one (pooled) of one layer
        if key in BUILT_MODELS:
            BUILT_MODELS.move_to_end(key)
            self.model, self.registers, self.input_size, self.pooling, self.readout = BUILT_MODELS[key]
        else:
            self._build()
            # A model file's pooling and input size are known once it is loaded: kept under the configuration as
            # asked and as resolved, so either finds it again.
            for k in dict.fromkeys((key, self._built_key())):
                if k is not None:
                    BUILT_MODELS[k] = (self.model, self.registers, self.input_size, self.pooling, self.readout)
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
        reachable = _reachable_layers(full)
        if self.layer:
            path = _find_layer(reachable, self.layer, self.model_path)
        else:
            pools = [p for p, l in reachable.items() if _own_pooling(l)]
            if not pools:
                raise FeatstackError(f"backbone {self.model_path}: no global-pooling layer; name the feature layer "
                                     f"as PATH:LAYER_NAME (reachable: {_listing(reachable)})")
            path = pools[-1]
        try:
            output = _output_in(full, path.split("/"), full.inputs[0])
        except FeatstackError:
            raise
        except Exception as exc:  # a layer Keras cannot cut the model at (an input, a multi-output block...)
            cause = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            raise FeatstackError(f"backbone {self.model_path}:{path}: the model cannot be cut at this layer ({cause})"
                                 "; name another layer") from None
        asking = self.readout == ASK
        where = f"{self.model_path}:{path}" if self.layer else f"{self.model_path} (its layer {path!r} by default)"
        try:
            pooling, readout, pool = _readout(output, reachable[path], self.pooling or None, where,
                                              lambda: f"{self.model_path}:{_pooled_input(full, path, reachable)}")
        except FeatstackError:
            if asking:
                raise
            pooling, readout, pool = self.pooling, None, None
        if pool is not None and not asking and self.width and self.width != output.shape[-1]:
            pool = readout = None  # flattened as the layer gave it
        if not asking and readout is None:
            # Rebuilt from a feature file made before the readout was recorded: its vectors are the layer's output
            # as it was (pooled only by the model itself, whatever its ``pooling`` says), and so are these.
            pooling = self.pooling
        if pool is not None:
            output = pool()(output)
        self.pooling, self.readout = pooling, readout
        model = keras.Model(full.inputs, output)
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
    if pooling is not None and pooling not in (*POOLINGS, *hub.POOLINGS, NO_POOLING):
        raise FeatstackError(f"--pooling {pooling}: choose one of avg, max (hub: encoders: also token, pooled; "
                             "a model file's vector layer: none)")
    for option, value, valid in (("--tta", tta, TTAS), ("--precision", precision, PRECISIONS)):
        if value not in valid:
            raise FeatstackError(f"{option} {value}: choose one of {', '.join(valid)}")
    if preprocess_mode is not None and preprocess_mode not in PREPROCESS_MODES[:3]:
        raise FeatstackError(f"--preprocess {preprocess_mode}: choose one of tf, caffe, torch")
    if not names:
        raise FeatstackError("--backbones: name at least one backbone")
    check_image_size(image_size, names)
    if len(set(names)) != len(names):
        raise FeatstackError(f"--backbones {','.join(names)}: a backbone is named twice")
    out = []
    for name in names:
        if hub.is_hub(name):
            out.append(_hub_backbone(name.removeprefix(hub.PREFIX), weights, pooling, tta, precision, seed))
            continue
        if is_model_file(name) and pooling in (None, *POOLINGS, NO_POOLING):
            out.append(_model_file_backbone(name, image_size, pooling, tta, preprocess_mode, precision, seed))
            continue
        if pooling not in (None, *POOLINGS):
            what = "a model file's vector layer" if pooling == NO_POOLING else "hub: encoders"
            raise FeatstackError(f"--pooling {pooling}: {name} pools avg or max ({pooling} is for {what})")
        pooling_ = pooling or "avg"
        spec = REGISTRY.get(name)
        if spec is None:
            raise FeatstackError(f"--backbones: unknown backbone {name!r}; valid: {', '.join(REGISTRY)} "
                                 "or a path to a .keras/.h5 model file")
        size = image_size or spec.input_size
        b = Backbone(name=name, input_size=size, preprocess=spec.preprocess, pooling=pooling_, tta=tta,
                     precision=precision, weights=weights, seed=seed, width=spec.width)
        _resolve_weights(b, spec.weights_file(size))
        out.append(b)
    files = tuple(Path(b.weights_file).name for b in out if b.weights == "imagenet")
    for b in out:
        b.imagenet_files = files
    return out


def check_image_size(image_size, names: list[str]) -> None:
    """--image-size is a whole number of pixels, at least the largest minimum of the registry backbones named."""
    if image_size is None:
        return
    floors = {n: REGISTRY[n].min_size for n in names if n in REGISTRY}
    who = max(floors, key=floors.get, default=None)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < (floors.get(who) or 1):
        raise FeatstackError(f"--image-size {image_size}: {who} needs at least {floors[who]} px" if who else
                             f"--image-size {image_size}: give a positive whole number of pixels")


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
    stem = Path(path).stem + (f"-{layer.replace('/', '.')}" if layer else "")
    b = Backbone(name=stem, input_size=image_size or 224, preprocess=preprocess_mode, pooling=pooling or "", tta=tta,
                 precision=precision, weights="file", weights_file=str(Path(path).resolve()),
                 weights_sha256=sha256_of(path), seed=seed, model_path=str(Path(path).resolve()), layer=layer or None,
                 readout=ASK)
    # Loaded now: the layer (its pooling, or none) and the model's own input size are part of the cache identity.
    b.build()
    return b


def _reachable_layers(model, prefix: str = "") -> dict:
    """Every layer by its path, a nested model's own layers under ``base/`` (a transfer-learning model's base)."""
    import keras
    out = {}
    for layer in model.layers:
        out[prefix + layer.name] = layer
        if isinstance(layer, keras.Model):
            out |= _reachable_layers(layer, f"{prefix}{layer.name}/")
    return out


def _listing(reachable: dict, most: int = 30) -> str:
    """The reachable layer paths, the first and last of a long model (its features are near the end)."""
    names = list(reachable)
    shown = names if len(names) <= most else [*names[:4], f"... ({len(names) - most} more) ...", *names[4 - most:]]
    return ", ".join(shown)


def _find_layer(reachable: dict, wanted: str, model_path: str) -> str:
    """The path of a named layer: as written (``base/layer``), or a nested layer's own name where only one has it."""
    if wanted in reachable:
        return wanted
    hits = [p for p in reachable if p.rsplit("/", 1)[-1] == wanted]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise FeatstackError(f"backbone {model_path}: layer {wanted!r} is in several nested models; name one of "
                             f"{', '.join(hits)}")
    raise FeatstackError(f"backbone {model_path}: no layer {wanted!r}; reachable layers: {_listing(reachable)}")


def _own_pooling(layer) -> str | None:
    kind = type(layer).__name__
    return "avg" if kind.startswith("GlobalAveragePooling") else "max" if kind.startswith("GlobalMaxPooling") else None


def _readout(output, layer, asked: str | None, where: str, pooled_input: Callable[[], str]):
    """What a model file's layer gives: (pooling recorded, readout, the Keras pooling layer to add or None).

    The model's own global pooling is its kind, a vector is pooled by nothing, a feature map is pooled here (avg
    unless asked); a --pooling that cannot be what is done is refused, never recorded.
    """
    import keras
    own = _own_pooling(layer)
    if own:
        if asked not in (None, own):
            raise FeatstackError(f"--pooling {asked}: {where} already {own}-pools; to {asked}-pool instead, name the "
                                 f"layer it pools: --backbones {pooled_input()} --pooling {asked}")
        return own, "layer", None
    rank = len(output.shape)
    if rank == 2:
        if asked not in (None, NO_POOLING):
            raise FeatstackError(f"--pooling {asked}: {where} gives vectors (width {output.shape[-1]}), not a feature "
                                 "map to pool; drop --pooling, or name a convolutional layer")
        return NO_POOLING, "layer", None
    if asked == NO_POOLING:
        raise FeatstackError(f"--pooling none: {where} gives a feature map of shape {tuple(output.shape[1:])}; pool "
                             "it with --pooling avg or max")
    pooling = asked or "avg"
    pools = {(3, "avg"): keras.layers.GlobalAveragePooling1D, (3, "max"): keras.layers.GlobalMaxPooling1D,
             (4, "avg"): keras.layers.GlobalAveragePooling2D, (4, "max"): keras.layers.GlobalMaxPooling2D,
             (5, "avg"): keras.layers.GlobalAveragePooling3D, (5, "max"): keras.layers.GlobalMaxPooling3D}
    if (rank, pooling) not in pools:
        raise FeatstackError(f"backbone {where}: its output of shape {tuple(output.shape[1:])} is not a feature map "
                             "for Keras's global pooling; name another layer")
    return pooling, "pooled", pools[rank, pooling]


def _graph(model):
    return getattr(model, "_functional", None) or model  # a Sequential keeps its graph in a Functional


def _node_in(container, layer, path: str):
    """The one call of ``layer`` in ``container``'s own graph (a nested model also has nodes of its own graph)."""
    graph = _graph(container)
    nodes = [n for depth in graph._nodes_by_depth.values() for n in depth if n.operation is layer]
    if len(nodes) != 1 or len(nodes[0].output_tensors) != 1 or len(graph.inputs) != 1:
        raise FeatstackError(f"backbone layer {path!r}: called {len(nodes)} times or with several inputs or outputs "
                             "in its model; name a layer with one image input and one output")
    return nodes[0]


def _output_in(container, path: list[str], inputs):
    """``inputs`` (a tensor of the outer model) carried to the output of the layer at ``path`` inside ``container``.

    A nested model's inner layers hang off its own Input, not the outer model's; so the outer layers up to the base
    (rescaling, augmentation) are applied first, then the base's own layers up to the named one.
    """
    import keras
    graph = _graph(container)
    layer = container.get_layer(path[0])
    node = _node_in(container, layer, "/".join(path))
    if len(path) == 1:
        return keras.Model(graph.inputs, node.output_tensors[0])(inputs)
    fed = node.input_tensors[0]
    if fed is not graph.inputs[0]:
        inputs = keras.Model(graph.inputs, fed)(inputs)
    return _output_in(layer, path[1:], inputs)


def _pooled_input(full, path: str, reachable: dict) -> str:
    """The path of the layer whose feature map a global-pooling layer pools (for a refusal's way on)."""
    *outer, _ = path.split("/")
    container = full
    for part in outer:
        container = container.get_layer(part)
    node = _node_in(container, reachable[path], path)
    source = node.input_tensors[0]._keras_history.operation
    return next((p for p, l in reachable.items() if l is source and p.startswith("/".join(outer))), source.name)
