"""Decode an image file once into RGB and resize it the way keras.utils.load_img does."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class BadImage(Exception):
    """An image file that cannot be decoded; the message is the reason recorded in bad_images.csv."""


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale: PIL's own convert clips at 255, turning most photos white.
        arr = np.asarray(img).astype(np.uint32)
        shift = 8 if arr.max(initial=0) > 255 else 0
        return Image.fromarray((arr >> shift).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels hold arbitrary colours; composite on white as viewers show them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, P, CMYK, YCbCr, 1


def decode_rgb(path: str | Path) -> Image.Image:
    """Read and decode one file into an RGB image with EXIF orientation applied, or raise BadImage."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            raise BadImage("empty file (0 bytes)")
        img = Image.open(io.BytesIO(data))
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except Exception as exc:  # PIL raises many types for broken files; each is a bad image
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadImage(f"{type(exc).__name__}: {reason}") from None


def resize(img: Image.Image, size: int) -> np.ndarray:
    """uint8 (size, size, 3) array, bilinear, exactly as load_img(target_size=(size, size), interpolation="bilinear")."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def decode_batch(paths: list[str], sizes: tuple[int, ...]) -> tuple[dict[int, np.ndarray], list[str | None]]:
    """Decode each path once and resize once per distinct size.

    Returns ``{size: uint8 (n_ok, size, size, 3)}`` over the images that decoded, and a per-path list
    of ``None`` (decoded) or the reason it could not be.
    """
    arrays: dict[int, list[np.ndarray]] = {s: [] for s in sizes}
    errors: list[str | None] = []
    for path in paths:
        try:
            img = decode_rgb(path)
            resized = {s: resize(img, s) for s in sizes}
        except BadImage as exc:
            errors.append(str(exc))
            continue
        for s in sizes:
            arrays[s].append(resized[s])
        errors.append(None)
    stacked = {s: (np.stack(a) if a else np.zeros((0, s, s, 3), np.uint8)) for s, a in arrays.items()}
    return stacked, errors
