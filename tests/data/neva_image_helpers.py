"""Building bad images for the safety tests."""
import io
import struct
import zlib

from PIL import Image


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb as far as the header goes)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    # IHDR data starts at byte 16 (8 signature + 4 length + 4 type); CRC covers type + data.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def truncated_png(size=(32, 32)) -> bytes:
    """Valid header, cut pixel data: passes a header check, fails at decode."""
    buf = io.BytesIO()
    Image.effect_noise(size, 64).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]
