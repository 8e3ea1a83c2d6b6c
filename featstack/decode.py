"""Decode an image file once into RGB and resize it the way keras.utils.load_img does."""
from __future__ import annotations

import io
import os
import re
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class BadImage(Exception):
    """An image file that cannot be decoded; the message is the reason recorded in bad_images.csv."""


def is_image_file(path: Path) -> bool:
    """An image by its name: an image suffix and not a folder. Dangling links, unreadable files and other
    non-files keep their place, so the decoder reports them instead of their vanishing from the dataset."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.is_dir()


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


_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")
_FILE_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


def _read_bytes(path: str | Path) -> bytes:
    """The file's bytes, or BadImage saying in words why it cannot be read."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise BadImage(f"file not found (dangling link to {os.readlink(path)})") from None
        raise BadImage("file not found") from None
    except PermissionError:
        raise BadImage("permission denied") from None
    except OSError as exc:
        raise BadImage(f"cannot read the file ({exc.strerror or type(exc).__name__})") from None
    if stat.S_ISDIR(mode):
        raise BadImage("a folder, not a file")
    if not stat.S_ISREG(mode):  # opening a pipe or device would block or read forever
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
        raise BadImage(f"not a regular file ({kind})")
    try:
        with open(path, "rb") as f:
            return f.read()
    except PermissionError:
        raise BadImage("permission denied") from None
    except OSError as exc:
        raise BadImage(f"cannot read the file ({exc.strerror or type(exc).__name__})") from None


def _reason(exc: Exception, fmt: str | None) -> str:
    """A decoder failure in words (PIL's messages name in-memory objects and internal calls)."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (unrecognised format)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"too large to decode safely ({exc})"
    if isinstance(exc, MemoryError):
        return "too large to decode (out of memory)"
    what = f"{fmt} image" if fmt else "image"
    message = _OBJECT_REPR.sub("", str(exc).splitlines()[0] if str(exc) else "").strip()
    if "truncated" in message.lower():
        return f"truncated {what} (the file ends before the image data does)"
    return f"damaged {what} data ({message or type(exc).__name__})"


def decode_rgb(path: str | Path) -> Image.Image:
    """Read and decode one file into an RGB image with EXIF orientation applied, or raise BadImage."""
    return decode_bytes(_read_bytes(path))


def decode_bytes(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode a file's bytes (or an upload's) as decode_rgb does, or raise BadImage. ``max_pixels`` refuses a larger
    image from its header alone, before a pixel is decoded (decompression bombs)."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    img = None
    try:
        img = Image.open(io.BytesIO(data))
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise BadImage(f"{img.width} x {img.height} pixels is more than the limit of {max_pixels:,}")
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except BadImage:
        raise
    except Exception as exc:  # PIL raises many types for broken files; each is a bad image
        raise BadImage(_reason(exc, getattr(img, "format", None))) from None


def resize(img: Image.Image, size: int) -> np.ndarray:
    """uint8 (size, size, 3) array, bilinear, as load_img(target_size=(size, size), interpolation="bilinear")."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def to_input(img: Image.Image, key) -> np.ndarray:
    """One decoded photo as a backbone takes it: ``key`` is a square size (uint8, as load_img) or a keras-hub
    preset's resize (float32, exactly its ImageConverter's; see hub.HubResize)."""
    return resize(img, key) if isinstance(key, int) else key.apply(img)


def empty(key) -> np.ndarray:
    if isinstance(key, int):
        return np.zeros((0, key, key, 3), np.uint8)
    return np.zeros((0, key.height, key.width, 3), np.float32)


def decode_batch(paths: list[str], sizes: tuple) -> tuple[dict, list[str | None]]:
    """Decode each path once and resize once per distinct input key (size, or a hub preset's resize).

    Returns ``{key: (n_ok, height, width, 3)}`` over the images that decoded, and a per-path list
    of ``None`` (decoded) or the reason it could not be.
    """
    arrays: dict = {s: [] for s in sizes}
    errors: list[str | None] = []
    for path in paths:
        try:
            img = decode_rgb(path)
            resized = {s: to_input(img, s) for s in sizes}
        except BadImage as exc:
            errors.append(str(exc))
            continue
        for s in sizes:
            arrays[s].append(resized[s])
        errors.append(None)
    stacked = {s: (np.stack(a) if a else empty(s)) for s, a in arrays.items()}
    return stacked, errors
