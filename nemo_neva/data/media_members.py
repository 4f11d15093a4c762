"""A streamed sample's own media (tar-shard members, Energon sample fields), served by the record's names.

NevaDataset reads media through `ImageSource` / `VideoSource` by the names a record lists (`"image"`, `"video"`,
in record order); a streamed sample carries the bytes instead. These two stand in for the folder sources for
one sample, with the same checks and error reasons (byte, pixel, frame limits; `missing` when the sample holds
fewer or more media than its record names), so `NevaDataset.encode` (a tiled image's size) and its item
building run unchanged on streamed data.
"""
from __future__ import annotations

import io
from typing import Sequence

import torch
from PIL import Image

from nemo_neva.data.image_io import ImageError, decode_image
from nemo_neva.data.video_io import VideoError
from nemo_neva.data.video_samples import VideoLimits, VideoSource


class _ByName:
    """name -> value for the names a record lists and the values a sample holds, both in record order."""

    def __init__(self, kind: str, names: Sequence[str], values: Sequence, error):
        self.kind, self.error = kind, error
        self.mismatch = None if len(names) == len(values) else \
            f"the record names {len(names)} {kind}(s) {list(names)!r} but the sample holds {len(values)}"
        self.values = dict(zip(names, values))  # a name listed twice is the same file, written twice

    def get(self, name: str):
        if self.mismatch:
            raise self.error("missing", self.mismatch)
        if name not in self.values:
            raise self.error("missing", f"{name!r} is not among the sample's {self.kind}s")
        return self.values[name]


def _open(value, name: str, max_bytes: int, max_pixels: int, header_only: bool):
    """bytes (checked, then decoded by image_io), a PIL image or a CHW tensor (Energon's own decoders) ->
    (height, width) with header_only, else a PIL RGB image; pixel limit checked first."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) > max_bytes:
            raise ImageError("too_large", f"{name!r}: {len(value)} bytes > {max_bytes}")
        return decode_image(bytes(value), name, max_pixels, header_only)
    if isinstance(value, Image.Image):
        h, w = value.height, value.width
    elif isinstance(value, torch.Tensor):  # CHW float in [0, 1] (or uint8)
        if value.ndim != 3 or value.shape[0] not in (1, 3, 4):
            raise ImageError("decode_failed", f"{name!r}: image tensor of shape {tuple(value.shape)}")
        h, w = int(value.shape[1]), int(value.shape[2])
    else:
        raise ImageError("decode_failed", f"{name!r}: unsupported image value {type(value).__name__}")
    if w * h > max_pixels:
        raise ImageError("too_many_pixels", f"{name!r}: {w}x{h} > {max_pixels} pixels")
    if header_only:
        return h, w
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    t = value.detach().cpu()
    if t.is_floating_point():
        t = (t.clamp(0, 1) * 255).round()
    arr = t.to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr[:, :, :3]).convert("RGB")


class MemberImages:
    """`ImageSource`'s check / size / load for one streamed sample's images."""

    def __init__(self, names: Sequence[str], values: Sequence, max_bytes: int, max_pixels: int):
        self.members = _ByName("image", names, values, ImageError)
        self.max_bytes, self.max_pixels = max_bytes, max_pixels

    def size(self, name: str) -> tuple[int, int]:
        return _open(self.members.get(name), name, self.max_bytes, self.max_pixels, header_only=True)

    def check(self, name: str) -> None:
        self.size(name)

    def load(self, name: str) -> Image.Image:
        return _open(self.members.get(name), name, self.max_bytes, self.max_pixels, header_only=False)


class MemberVideos(VideoSource):
    """`VideoSource`'s check / load (open_video within `model.data.video` limits) for one streamed sample's
    videos (bytes)."""

    def __init__(self, names: Sequence[str], values: Sequence, settings, limits: VideoLimits):
        self.members = _ByName("video", names, values, VideoError)
        self.settings, self.limits = settings, limits

    def _read(self, name: str) -> io.BytesIO:
        value = self.members.get(name)
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise VideoError("bad_format", f"{name!r}: a video must arrive as its file's bytes, got "
                                           f"{type(value).__name__}")
        if len(value) > self.limits.max_bytes:
            raise VideoError("too_large", f"{name!r}: {len(value)} bytes > {self.limits.max_bytes}")
        stream = io.BytesIO(value)
        stream.name = name  # video_io's messages name it
        return stream
