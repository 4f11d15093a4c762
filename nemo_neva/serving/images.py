"""Images in requests: only inline `data:` URLs, decoded within the byte and pixel limits.

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


def image_from_url(url, limits: ServerLimits, param: str):
    """An `image_url.url` -> RGB PIL image, or a RequestError saying why not."""
    if not isinstance(url, str) or not url:
        raise RequestError("image_url.url must be a non-empty string", param)
    head = url[:16].lower()
    if head.startswith(("http://", "https://", "ftp://")):
        raise RequestError("remote image URLs are not fetched; send the image inline as a data: URL "
                           "(data:image/png;base64,...)", param, code="remote_url_refused")
    if not head.startswith("data:"):
        raise RequestError("local file paths and non-data URLs are refused; send the image inline as a "
                           "data: URL (data:image/png;base64,...)", param, code="local_path_refused")
    m = _DATA_URL.match(url)
    if not m or not m.group("b64"):
        raise RequestError("a data: URL must look like data:image/<type>;base64,<data>", param)
    if m.group("mime") and not m.group("mime").lower().startswith("image/"):
        raise RequestError(f"data: URL media type {m.group('mime')!r} is not an image", param)
    payload = url[m.end():]
    # 4 base64 characters carry 3 bytes: refuse before decoding anything too large.
    if (len(payload) // 4) * 3 > limits.max_image_bytes + 2:
        raise RequestError(f"image is larger than the limit of {limits.max_image_bytes} bytes", param,
                           code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("image data is not valid base64", param) from None
    try:
        return open_user_image(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels)
    except ImageError as e:
        code = {"too_large": "image_too_large", "too_many_pixels": "image_too_many_pixels"}.get(e.reason,
                                                                                              "bad_image")
        raise RequestError(f"image refused: {e.detail.replace('<bytes>', 'image')}", param, code=code) from None
