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


class EndlessStream:
    """A file object that never ends and records every read: reading it whole would never return."""

    def __init__(self):
        self.reads = []

    def read(self, size=-1):
        self.reads.append(size)
        if size is None or size < 0:
            raise AssertionError("the whole stream was asked for")
        return b"\x89" * size


def test_byte_limit_is_checked_before_reading(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    big.write_bytes(real_png((64, 64)))
    opened, real_open = [], open

    def spy_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy_open)
    with pytest.raises(ImageError, match="too_large"):
        open_user_image(big, max_bytes=100)
    assert str(big) not in opened  # refused from the file's size: never opened
    assert open_user_image(big, max_bytes=big.stat().st_size).size == (64, 64)  # at the limit: read
    assert str(big) in opened
    stream = EndlessStream()
    with pytest.raises(ImageError, match="too_large"):
        open_user_image(stream, max_bytes=100)
    assert stream.reads == [101]  # one bounded read: one byte past the limit proves it is too large


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
