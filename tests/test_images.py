"""cw.load_image: everything convertible is converted; everything else gets a clear error."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import cnnwidgets as cw
from cnnwidgets.engine import images


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_sample_images_offline():
    for name in cw.sample_images():
        img = cw.sample_image(name)
        assert img.mode == "RGB" and min(img.size) >= 64
    with pytest.raises(ValueError, match="cat"):
        cw.sample_image("dog")


def test_greyscale_becomes_rgb():
    img = cw.load_image(np.full((10, 12), 7, np.uint8))
    assert img.mode == "RGB" and img.size == (12, 10)
    assert np.asarray(img)[0, 0].tolist() == [7, 7, 7]


def test_rgba_is_composited_on_white():
    a = np.zeros((10, 10, 4), np.uint8)
    a[..., 0] = 255
    a[:5, :, 3] = 255  # top half opaque red, bottom half transparent
    rgb = np.asarray(cw.load_image(a))
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[9, 9].tolist() == [255, 255, 255]


def test_sixteen_bit_png_and_array(tmp_path):
    a16 = np.full((10, 10), 65535, np.uint16)
    a16[0, 0] = 0
    rgb = np.asarray(cw.load_image(a16))
    assert rgb[1, 1].tolist() == [255] * 3 and rgb[0, 0].tolist() == [0] * 3
    path = tmp_path / "deep.png"
    Image.fromarray(a16).save(path)
    rgb = np.asarray(cw.load_image(path))
    assert rgb.dtype == np.uint8 and rgb[1, 1].tolist() == [255] * 3 and rgb[0, 0].tolist() == [0] * 3


def test_float_arrays_and_tensors():
    a = np.zeros((3, 9, 9), np.float32)
    a[1] = 1.0
    img = np.asarray(cw.load_image(torch.from_numpy(a)))  # channels-first tensor
    assert img[0, 0].tolist() == [0, 255, 0]
    img = np.asarray(cw.load_image(torch.from_numpy(a)[None]))  # with a batch of one
    assert img[0, 0].tolist() == [0, 255, 0]
    with pytest.raises(ValueError, match="normalisation"):
        cw.load_image(np.full((9, 9, 3), -2.0))


def test_bytes_path_and_pil_agree(tmp_path):
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    data = _png_bytes(pil)
    (tmp_path / "x.png").write_bytes(data)
    for source in (pil, data, tmp_path / "x.png", str(tmp_path / "x.png"), np.asarray(pil)):
        assert np.array_equal(np.asarray(cw.load_image(source)), np.asarray(pil))


def test_bad_tensor_shapes():
    with pytest.raises(ValueError, match="batch of 2"):
        cw.load_image(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="not an image"):
        cw.load_image(torch.zeros(5, 16, 16))
    with pytest.raises(ValueError, match="not an image"):
        cw.load_image(np.zeros((16, 16, 7)))


def test_tiny_image_refused():
    with pytest.raises(ValueError, match="at least 8"):
        cw.load_image(np.zeros((4, 40), np.uint8))


def test_huge_image_is_shrunk():
    img = cw.load_image(np.zeros((100, images.MAX_SIDE * 2), np.uint8))
    assert max(img.size) == images.MAX_SIDE


def _fake_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height pixels (and holds no real pixel data)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_refused(tmp_path):
    bomb = _fake_png_header(60_000, 60_000)
    with pytest.raises(ValueError, match="decompression bomb"):
        cw.load_image(bomb)
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(ValueError, match="decompression bomb"):
        cw.load_image(tmp_path / "bomb.png")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not an image file"):
        cw.load_image(path)
    with pytest.raises(ValueError, match="no such image file"):
        cw.load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="folder"):
        cw.load_image(tmp_path)
    with pytest.raises(ValueError, match="cannot load an image from a dict"):
        cw.load_image({"a": 1})
    with pytest.raises(ValueError, match="not an image file"):
        cw.load_image(b"\x00\x01garbage")
