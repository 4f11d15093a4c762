"""Images in requests: inline `data:` URLs (HTTP server) or raw RGB pixel arrays (Triton's `input_media`),
within the byte and pixel limits.

The server never fetches a URL or opens a path a client names: that would let any client make it read
local files or reach hosts behind it (SSRF).
"""
from __future__ import annotations

import base64
import binascii
import re

from nemo_neva.data.image_io import ImageError, open_user_image
from nemo_neva.serving.errors import RequestError
from nemo_neva.serving.limits import ServerLimits

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.ASCII)


def data_url_bytes(url, limits_bytes: int, param: str, kind: str = "image", example: str = "image/png") -> bytes:
    """The bytes of an inline `data:<kind>/...;base64,` URL within `limits_bytes`, or a RequestError
    (remote URLs and local paths refused, the size checked from the base64 length before decoding)."""
    field = f"{kind}_url.url"
    if not isinstance(url, str) or not url:
        raise RequestError(f"{field} must be a non-empty string", param)
    hint = f"send the {kind} inline as a data: URL (data:{example};base64,...)"
    head = url[:16].lower()
    if head.startswith(("http://", "https://", "ftp://")):
        raise RequestError(f"remote {kind} URLs are not fetched; {hint}", param, code="remote_url_refused")
    if not head.startswith("data:"):
        raise RequestError(f"local file paths and non-data URLs are refused; {hint}", param,
                           code="local_path_refused")
    m = _DATA_URL.match(url)
    if not m or not m.group("b64"):
        raise RequestError(f"a data: URL must look like data:{kind}/<type>;base64,<data>", param)
    if m.group("mime") and not m.group("mime").lower().startswith(f"{kind}/"):
        raise RequestError(f"data: URL media type {m.group('mime')!r} is not a{'n' * (kind[0] in 'aeiou')} {kind}",
                           param)
    payload = url[m.end():]
    # 4 base64 characters carry 3 bytes: refuse before decoding anything too large.
    if (len(payload) // 4) * 3 > limits_bytes + 2:
        raise RequestError(f"{kind} is larger than the limit of {limits_bytes} bytes", param,
                           code=f"{kind}_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{kind} data is not valid base64", param) from None


def image_from_url(url, limits: ServerLimits, param: str):
    """An `image_url.url` -> RGB PIL image, or a RequestError saying why not."""
    data = data_url_bytes(url, limits.max_image_bytes, param)
    try:
        return open_user_image(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels)
    except ImageError as e:
        code = {"too_large": "image_too_large", "too_many_pixels": "image_too_many_pixels"}.get(e.reason,
                                                                                              "bad_image")
        raise RequestError(f"image refused: {e.detail.replace('<bytes>', 'image')}", param, code=code) from None


def image_from_array(pixels, limits: ServerLimits, param: str):
    """An RGB pixel array [H, W, 3] of uint8 (one image of a Triton `input_media`) -> RGB PIL image, or a
    RequestError. Nothing is decoded, so the pixel limit is the one that applies (not the byte limit,
    which bounds encoded files)."""
    import numpy as np
    from PIL import Image

    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        raise RequestError("an image must be uint8 RGB pixels", param)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise RequestError(f"an image must be [height, width, 3] RGB pixels, got shape {list(pixels.shape)}", param)
    h, w = int(pixels.shape[0]), int(pixels.shape[1])
    if h < 1 or w < 1:
        raise RequestError(f"image of {w}x{h} pixels is empty", param, code="bad_image")
    if h * w > limits.max_image_pixels:
        raise RequestError(f"image refused: {w}x{h} = {h * w} pixels exceed the limit of {limits.max_image_pixels}",
                           param, code="image_too_many_pixels")
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")
