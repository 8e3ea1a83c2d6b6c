"""One decoder for every image kind: correct RGB out, or a recorded reason why not."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from featstack.decode import BadImage, decode_batch, decode_rgb, resize

from conftest import photo


def _save(img, path, fmt=None, **kw):
    img.save(path, format=fmt, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "CMYK", "P"])
def test_modes_decode_to_rgb(tmp_path, mode):
    src = photo(1)
    path = _save(src.convert(mode), tmp_path / "x.jpg" if mode != "P" else tmp_path / "x.png")
    img = decode_rgb(path)
    assert img.mode == "RGB" and img.size == src.size
    expected = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert np.abs(np.asarray(img, np.float32) - expected).mean() < 1.0


def test_rgba_composites_on_white(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :5, 3] = 255  # left half opaque red, right half fully transparent
    path = _save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")
    out = np.asarray(decode_rgb(path))
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[0, 9]) == (255, 255, 255)


def test_16_bit_greyscale_keeps_its_range(tmp_path):
    arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "deep.png")
    out = np.asarray(decode_rgb(path))
    assert out.shape == (64, 64, 3)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255 and 100 < out[32, 32, 0] < 156


def test_png_named_jpg(tmp_path):
    path = _save(photo(2), tmp_path / "really_png.jpg", fmt="PNG")
    assert np.array_equal(np.asarray(decode_rgb(path)), np.asarray(photo(2)))


def test_exif_orientation_is_applied(tmp_path):
    img = photo(3, (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(img, tmp_path / "rot.jpg", exif=exif, quality=95)
    assert decode_rgb(path).size == (20, 40)


def _half(fmt: str) -> bytes:
    buf = io.BytesIO()
    photo(4, (300, 200)).save(buf, format=fmt)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.parametrize("content, reason", [
    (b"", r"^empty file \(0 bytes\)$"),
    (b"this is not an image", r"^not an image \(unrecognised format\)$"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 30, r"^not an image \(unrecognised format\)$"),
    (_half("JPEG"), r"^truncated JPEG image \(the file ends before the image data does\)$"),
    (_half("PNG"), r"^truncated PNG image \(the file ends before the image data does\)$"),
    (_half("WEBP"), r"^damaged image data \(could not create decoder object\)$"),
])
def test_bad_bytes_have_reasons_for_people(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(BadImage, match=reason) as err:
        decode_rgb(path)
    assert "0x" not in str(err.value) and "object at" not in str(err.value)  # no Python object addresses


def _dangling_link(path):
    path.symlink_to(path.parent / "moved_away.jpg")


def _named_pipe(path):
    os.mkfifo(path)  # opening it for reading would block forever: the decoder must not


def _unreadable(path):
    _save(photo(6), path)
    path.chmod(0)


@pytest.mark.parametrize("make, reason", [
    (lambda p: None, r"^file not found$"),
    (_dangling_link, r"^file not found \(dangling link to .*moved_away\.jpg\)$"),
    (_named_pipe, r"^not a regular file \(a named pipe\)$"),
    (lambda p: p.mkdir(), r"^a folder, not a file$"),
    pytest.param(_unreadable, r"^permission denied$", marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="root reads mode-000 files; the pipe and the dangling link cover unreadable files")),
])
def test_unreadable_files_have_reasons(tmp_path, make, reason):
    path = tmp_path / "x.jpg"
    make(path)
    with pytest.raises(BadImage, match=reason):
        decode_rgb(path)


def test_decode_batch_resizes_once_per_size_and_reports_failures(tmp_path):
    good = _save(photo(5), tmp_path / "g.jpg")
    (tmp_path / "b.jpg").write_bytes(b"")
    arrays, errors = decode_batch([str(good), str(tmp_path / "b.jpg")], (32, 75))
    assert errors[0] is None and "empty" in errors[1]
    assert arrays[32].shape == (1, 32, 32, 3) and arrays[75].shape == (1, 75, 75, 3)
    assert arrays[75].dtype == np.uint8
    assert np.array_equal(arrays[75][0], resize(decode_rgb(good), 75))
