"""Generation inputs: the image loader of examples/neva_generate.py refuses bombs, oversized and broken files."""
import io
import struct
import zlib

import pytest
from PIL import Image

from nemo_neva.data.image_io import ImageError, open_user_image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side=100_000) -> bytes:
    """A ~100-byte PNG that claims side x side pixels (10 giga-pixels); its IDAT inflates from a few bytes."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\0" * 4096, 9)  # far too little data, decoding would keep inflating zeros
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def real_png(size=(64, 64)) -> bytes:
    img = Image.frombytes("RGB", size, bytes(range(256)) * (size[0] * size[1] * 3 // 256 + 1))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("as_path", [True, False])
def test_decompression_bomb_is_refused_from_header(tmp_path, as_path):
    data = bomb_png()
    assert len(data) < 200
    src = tmp_path / "bomb.png" if as_path else data
    if as_path:
        src.write_bytes(data)
    with pytest.raises(ImageError, match="too_many_pixels"):
        open_user_image(src)


def test_pixel_limit_is_configurable(tmp_path):
    (tmp_path / "ok.png").write_bytes(real_png((64, 64)))
    assert open_user_image(tmp_path / "ok.png").size == (64, 64)
    with pytest.raises(ImageError, match="too_many_pixels"):
        open_user_image(tmp_path / "ok.png", max_pixels=64 * 63)


def test_truncated_png_is_refused(tmp_path):
    data = real_png((64, 64))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt"):
        open_user_image(tmp_path / "cut.png")


def test_byte_limit_is_checked_before_reading(tmp_path):
    (tmp_path / "big.png").write_bytes(real_png((64, 64)))
    with pytest.raises(ImageError, match="too_large"):
        open_user_image(tmp_path / "big.png", max_bytes=100)
    with pytest.raises(ImageError, match="too_large"):
        open_user_image(io.BytesIO(real_png((64, 64))), max_bytes=100)


def test_not_an_image_and_missing_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"#!/bin/sh\necho hi\n")
    with pytest.raises(ImageError, match="bad_format"):
        open_user_image(tmp_path / "x.png")
    with pytest.raises(ImageError, match="missing"):
        open_user_image(tmp_path / "nope.png")


def test_pil_image_input_is_checked_and_converted():
    img = Image.new("L", (10, 10))
    assert open_user_image(img).mode == "RGB"
    with pytest.raises(ImageError, match="too_many_pixels"):
        open_user_image(img, max_pixels=50)


def test_neva_generate_example_uses_the_guarded_loader():
    import os

    from tests.model.helpers import ROOT

    src = open(os.path.join(ROOT, "nemo_neva", "commands", "neva_generate.py")).read()  # examples/ wraps it
    assert "open_user_image(" in src and "Image.open(" not in src
