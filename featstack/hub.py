"""keras-hub presets as backbones: the preset's ImageConverter reproduced after the one decode, and its readout."""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FeatstackError

PREFIX = "hub:"
INSTALL_HINT = 'pip install "featstack[hub]"'
# Image-text towers: the stored vector is the image embedding the preset pairs with text.
EMBEDDING_CLASSES = ("SigLIPBackbone", "SigLIP2Backbone", "CLIPBackbone")
# ViT encoders: [class token, register tokens..., patch tokens...]; the class token is the default readout.
TOKEN_CLASSES = ("DINOV2Backbone", "DINOV3Backbone", "ViTBackbone")
POOLINGS = {"token": "the class token", "avg": "the mean of the patch tokens", "max": "the max of the patch tokens",
            "pooled": "the pooled image embedding"}
_VERSION_FOLDER_SKIP = {"keras", "tensorflow2", "jax", "pytorch", "other"}


def is_hub(name: str) -> bool:
    return name.startswith(PREFIX)


def import_hub():
    try:
        import keras_hub
    except ImportError:
        raise FeatstackError(f"hub: backbones need keras-hub, an optional extra: {INSTALL_HINT}") from None
    return keras_hub


@dataclass(frozen=True)
class HubResize:
    """The resize of a preset's ImageConverter (a keras.layers.Resizing): the decoder applies it to the full photo."""

    height: int
    width: int
    crop_to_aspect_ratio: bool
    pad_to_aspect_ratio: bool
    interpolation: str
    antialias: bool

    def __str__(self) -> str:  # Ray column names and logs
        mode = "crop" if self.crop_to_aspect_ratio else "pad" if self.pad_to_aspect_ratio else "stretch"
        return f"hub{self.height}x{self.width}{mode}{self.interpolation}{'aa' if self.antialias else ''}"

    def apply(self, img) -> np.ndarray:
        """float32 (height, width, 3) of one decoded RGB photo, exactly as the converter resizes it."""
        layer = _resizing_layer(self)
        return np.asarray(layer(np.asarray(img, dtype=np.uint8)), dtype=np.float32)


_LAYERS = threading.local()  # one Resizing layer per decode thread and resize


def _resizing_layer(r: HubResize):
    layers = getattr(_LAYERS, "layers", None)
    if layers is None:
        layers = _LAYERS.layers = {}
    if r not in layers:
        import keras
        layers[r] = keras.layers.Resizing(r.height, r.width, crop_to_aspect_ratio=r.crop_to_aspect_ratio,
                                          pad_to_aspect_ratio=r.pad_to_aspect_ratio, interpolation=r.interpolation,
                                          antialias=r.antialias)
    return layers[r]


def short_name(preset: str) -> str:
    """``hub:NAME`` for a preset name; for a folder, its name (Kaggle's .../MODEL/keras/VARIANT/VERSION: joined)."""
    path = Path(preset)
    if not path.is_dir():
        return PREFIX + preset
    parts = [p for p in path.resolve().parts[1:] if p not in _VERSION_FOLDER_SKIP]
    if parts and parts[-1].isdigit():  # a version folder names nothing by itself
        parts = parts[-3:]
    else:
        parts = parts[-1:]
    return PREFIX + "_".join(parts)


def preset_folder(preset: str) -> Path:
    """The local folder of a preset: the folder given, or keras-hub's download of a preset name."""
    if Path(preset).is_dir():
        if not (Path(preset) / "config.json").is_file():
            raise FeatstackError(f"--backbones hub:{preset}: no config.json there; a keras-hub preset folder is what "
                                 "save_to_preset writes (config.json, model.weights.h5, preprocessor files)")
        return Path(preset).resolve()
    import_hub()
    from keras_hub.src.utils import preset_utils
    if "/" in preset or preset.startswith((".", "~")):
        raise FeatstackError(f"--backbones hub:{preset}: no such folder")
    try:
        config = preset_utils.get_file(preset, preset_utils.CONFIG_FILE)
        folder = Path(config).parent
        for name in ("image_converter.json", "model.weights.h5"):
            if preset_utils.check_file_exists(preset, name):
                preset_utils.get_file(preset, name)
    except Exception as exc:
        cause = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise FeatstackError(
            f"--backbones hub:{preset}: the keras-hub preset {preset!r} cannot be downloaded ({cause}). Offline, "
            f"attach it as a folder: save it where there is internet (keras_hub.models.Backbone.from_preset("
            f"{preset!r}).save_to_preset(DIR), and the same for its ImageConverter) or add it to a Kaggle notebook "
            "from Kaggle Models, then pass --backbones hub:/path/to/that/folder") from None
    return folder


def preset_files(folder: Path) -> dict[str, str]:
    """sha256 of every file of a preset folder, by relative path: the preset's identity, weights included."""
    from .backbones import sha256_of
    return {str(p.relative_to(folder)): sha256_of(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class PresetFacts:
    folder: Path
    class_name: str
    resize: HubResize
    scale: tuple | float | None
    offset: tuple | float | None
    files: dict


def read_preset(preset: str) -> PresetFacts:
    """What a preset folder says about itself, without loading its weights."""
    folder = preset_folder(preset)
    keras_hub = import_hub()
    try:
        config = json.loads((folder / "config.json").read_text())
        converter = keras_hub.layers.ImageConverter.from_preset(str(folder))
    except Exception as exc:
        cause = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise FeatstackError(f"--backbones hub:{preset}: not a keras-hub image preset with an ImageConverter "
                             f"({cause})") from None
    if converter.image_size is None:
        raise FeatstackError(f"--backbones hub:{preset}: its ImageConverter has no image_size to resize photos to")
    h, w = (int(v) for v in converter.image_size)
    resize = HubResize(h, w, bool(converter.crop_to_aspect_ratio), bool(converter.pad_to_aspect_ratio),
                       str(converter.interpolation), bool(converter.antialias))
    return PresetFacts(folder, config.get("class_name", ""), resize, _plain(converter.scale),
                       _plain(converter.offset), preset_files(folder))


def _plain(v):
    if v is None:
        return None
    arr = np.asarray(v, dtype=np.float32)
    return float(arr) if arr.ndim == 0 else tuple(float(x) for x in arr.ravel())


def default_pooling(class_name: str) -> str:
    if class_name in EMBEDDING_CLASSES:
        return "pooled"
    if class_name in TOKEN_CLASSES:
        return "token"
    return "avg"


def check_pooling(preset: str, class_name: str, pooling: str) -> None:
    if class_name in EMBEDDING_CLASSES:
        valid = ("pooled",)
    elif class_name in TOKEN_CLASSES:
        valid = ("token", "avg", "max")
    else:
        valid = ("avg", "max")
    if pooling not in valid:
        raise FeatstackError(f"--pooling {pooling}: hub:{preset} ({class_name}) gives "
                             f"{' or '.join(f'{p} ({POOLINGS[p]})' for p in valid)}; omit --pooling for its default")


def build_model(folder: Path, class_name: str, dtype: str | None = None):
    """The preset's model, taking a plain image batch, whose output the readout turns into one vector per photo."""
    import keras
    keras_hub = import_hub()
    # A preset's config names its own dtype; --precision bf16 must override it, as it does for the registry.
    try:
        backbone = keras_hub.models.Backbone.from_preset(str(folder), **({"dtype": dtype} if dtype else {}))
    except Exception as exc:  # keras-hub and h5py raise ValueError, OSError, KeyError... for a damaged folder
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise FeatstackError(
            f"--backbones hub:{folder}: the preset's weights do not load into the model its config.json describes "
            f"({cause}); the weights file is truncated, damaged or from another preset: restore the folder as "
            "save_to_preset wrote it (config.json and model.weights.h5 of the same preset)") from None
    encoder = backbone.vision_encoder if class_name in EMBEDDING_CLASSES else backbone
    images = keras.Input(shape=encoder.image_shape, name="images")
    out = encoder({"images": images})
    if class_name == "CLIPBackbone":  # CLIP's image embedding is projected after its encoder
        out = backbone.vision_projection(backbone.vision_pooler(out))
    return keras.Model(images, out), int(getattr(backbone, "num_register_tokens", 0) or 0)


def readout(out: np.ndarray, pooling: str, registers: int) -> np.ndarray:
    """One vector per photo from the model's output: the class token, or a pool of the patch tokens (or map)."""
    if pooling == "pooled":
        return out
    if out.ndim == 4:  # a convolutional feature map
        return out.mean(axis=(1, 2)) if pooling == "avg" else out.max(axis=(1, 2))
    if pooling == "token":
        return out[:, 0]
    patches = out[:, 1 + registers:]  # the class token and the registers are not patches
    return patches.mean(axis=1) if pooling == "avg" else patches.max(axis=1)
