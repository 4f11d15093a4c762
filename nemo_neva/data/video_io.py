"""Videos as sequences of sampled frames: PyAV decoding within limits, frame sampling, `<video>` tags.

A video enters the model as `num_frames` images, each preprocessed and encoded exactly like an image, and
in text a `<video>` tag becomes `num_frames` `<image>` tags (`expand_video_tags`), so the placeholder count
of a video (num_frames x tokens per image) is known before the forward pass. A video shorter than
`num_frames` repeats frames rather than changing that count.

Untrusted input: the container format is sniffed from the first bytes and only mp4/mov, Matroska/WebM and
AVI are handed to FFmpeg, with that demuxer forced (no probing, no playlists or protocols); byte size,
frame count and decoded pixels are bounded before and during decoding. Every failure is a `VideoError`
(an `ImageError`, so code that skips bad images skips bad videos too) with a short `reason`.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import Optional

from nemo_neva.data.constants import IMAGE_TOKEN, VIDEO_TOKEN
from nemo_neva.data.image_io import DEFAULT_MAX_PIXELS as DEFAULT_MAX_FRAME_PIXELS
from nemo_neva.data.image_io import ImageError, check_file_size

SAMPLINGS = ("uniform", "first")
DEFAULT_NUM_FRAMES = 8
DEFAULT_SAMPLING = "uniform"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_FRAMES = 18_000  # frames in the file (10 minutes at 30 fps); counted before decoding
DEFAULT_MAX_PIXELS = 1920 * 1080 * 3000  # decoded pixels per video (100 s of 1080p at 30 fps)

# First bytes -> the FFmpeg demuxer forced for them.
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")
FORMATS = ("mp4/mov", "matroska/webm", "avi")


class VideoError(ImageError):
    """A video that must not be used; `reason`: missing, too_large, bad_format, no_video, no_frames,
    too_many_frames, too_many_pixels, corrupt."""


@dataclass(frozen=True)
class VideoSettings:
    num_frames: int = DEFAULT_NUM_FRAMES
    sampling: str = DEFAULT_SAMPLING

    def __post_init__(self):
        if isinstance(self.num_frames, bool) or not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise ValueError(f"video num_frames must be an integer >= 1, got {self.num_frames!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"video sampling must be one of {SAMPLINGS}, got {self.sampling!r}")


@dataclass
class Video:
    """A decoded video: the frames `open_video` sampled (a `generate` request may hold one per `<video>`)."""
    frames: list  # PIL RGB images, one per sampled index
    indices: list[int]  # which frame of the file each one is
    total_frames: int


def video_settings_of(model_cfg, num_frames: Optional[int] = None, sampling: Optional[str] = None) -> VideoSettings:
    """`model.data.video.{num_frames, sampling}` of a model config (recorded in its .nemo), with the given
    values (not None) laid over them; a config without them has the defaults (8 frames, uniform)."""
    data = model_cfg.get("data") if model_cfg is not None else None
    video = (data.get("video") if data is not None else None) or {}
    return VideoSettings(
        num_frames=num_frames if num_frames is not None else video.get("num_frames", DEFAULT_NUM_FRAMES),
        sampling=sampling if sampling is not None else video.get("sampling", DEFAULT_SAMPLING))


def sample_indices(total: int, num_frames: int, sampling: str = DEFAULT_SAMPLING) -> list[int]:
    """Which of `total` frames to keep, in order (always `num_frames` of them).

    uniform: the first frame of each of `num_frames` equal segments, `i * total // num_frames` (Hugging Face
    `transformers.video_utils.default_sample_indices_fn`'s choice); first: the first `num_frames` frames.
    A video with fewer frames repeats some (uniform) or its last frame (first).
    """
    VideoSettings(num_frames, sampling)
    if total < 1:
        raise VideoError("no_frames", "the video has no frames")
    if sampling == "uniform":
        return [i * total // num_frames for i in range(num_frames)]
    return [min(i, total - 1) for i in range(num_frames)]


def expand_video_tags(text: str, num_frames: int) -> str:
    """Each `<video>` tag -> `num_frames` `<image>` tags (one per sampled frame, back to back). After this,
    every `<image>` tag of the text takes the next image or frame, in order."""
    return text.replace(VIDEO_TOKEN, IMAGE_TOKEN * num_frames)


def expand_media(text: str, media) -> tuple[str, list]:
    """A text whose `<image>` / `<video>` tags take `media` in order (an image per `<image>`, a `Video` per
    `<video>`) -> (the text with each `<video>` expanded to its frames' `<image>` tags, the flat image list)."""
    media = list(media)
    parts = re.split(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})", text)
    tags = parts[1::2]
    if len(tags) != len(media):
        raise ValueError(f"{len(tags)} {IMAGE_TOKEN}/{VIDEO_TOKEN} tag(s) for {len(media)} image(s)/video(s): "
                         f"one tag per image or video, in order")
    images = []
    for k, (tag, item) in enumerate(zip(tags, media)):
        is_video = isinstance(item, Video)
        if (tag == VIDEO_TOKEN) != is_video:
            raise ValueError(f"tag {k + 1} is {tag} but its item is {'a video' if is_video else 'not a video'}")
        if is_video:
            parts[2 * k + 1] = IMAGE_TOKEN * len(item.frames)
            images += item.frames
        else:
            images.append(item)
    return "".join(parts), images


def media_in_tag_order(text: str, images, videos) -> list:
    """The images (one per `<image>` tag) and videos (one per `<video>` tag) of `text`, merged in the order of
    their tags, as `expand_media` / `generate` take them; a count that does not match its tags is a ValueError."""
    images, videos = list(images), list(videos)
    tags = re.findall(f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}", text)
    for tag, items, kind in ((IMAGE_TOKEN, images, "image"), (VIDEO_TOKEN, videos, "video")):
        if tags.count(tag) != len(items):
            raise ValueError(f"{tags.count(tag)} {tag} tag(s) for {len(items)} {kind}(s): one tag per {kind}")
    pending = {IMAGE_TOKEN: iter(images), VIDEO_TOKEN: iter(videos)}
    return [next(pending[tag]) for tag in tags]


def sniff_container(head: bytes) -> Optional[str]:
    if head[4:8] in _MP4_BOXES:
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    return None


def _open_bytes(src, max_bytes: int):
    """(name, seekable binary stream) within `max_bytes`."""
    if isinstance(src, (str, os.PathLike)):
        name = os.fspath(src)
        check_file_size(name, max_bytes, VideoError)
        return name, open(name, "rb")
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, name = bytes(src), "<bytes>"
    elif hasattr(src, "read"):
        data, name = src.read(max_bytes + 1), str(getattr(src, "name", "<stream>"))
    else:
        raise TypeError(f"expected a video path, bytes or file object, got {type(src).__name__}")
    if len(data) > max_bytes:
        raise VideoError("too_large", f"{name!r}: more than {max_bytes} bytes")
    return name, io.BytesIO(data)


def _count_frames(av, fh, fmt: str, name: str, max_frames: int) -> tuple[int, int, int]:
    """(frames, width, height) from the packets of the first video stream, without decoding."""
    with av.open(fh, format=fmt) as container:
        if not container.streams.video:
            raise VideoError("no_video", f"{name}: no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        count = 0
        for packet in container.demux(stream):
            if packet.size:
                count += 1
                if count > max_frames:
                    raise VideoError("too_many_frames", f"{name}: more than {max_frames} frames")
    return count, width, height


def _decode(av, fh, fmt: str, name: str, keep: list[int], max_pixels: int):
    """PIL RGB frames at the sorted-unique indices `keep`, decoding no further than the last of them."""
    wanted, frames, decoded_pixels = set(keep), {}, 0
    with av.open(fh, format=fmt) as container:
        for i, frame in enumerate(container.decode(video=0)):
            w, h = frame.width, frame.height
            decoded_pixels += w * h
            if w * h > DEFAULT_MAX_FRAME_PIXELS or decoded_pixels > max_pixels:
                raise VideoError("too_many_pixels", f"{name}: more than {max_pixels} decoded pixels "
                                 f"(frame {i} is {w}x{h})")
            if i in wanted:
                frames[i] = frame.to_image()
            if i >= keep[-1]:
                break
    missing = wanted - frames.keys()
    if missing:
        raise VideoError("corrupt", f"{name}: frame {min(missing)} could not be decoded "
                         f"({len(frames)} of {len(wanted)} wanted frames decoded)")
    return frames


def _import_av():
    try:
        import av
    except ImportError as err:  # pragma: no cover - av is an install requirement
        raise ImportError("video input needs PyAV: pip install av") from err
    return av


def _plan(av, fh, name: str, settings: VideoSettings, max_frames: int, max_pixels: int):
    """(format, total frames, sampled indices) from the bytes' sniffed format and the packets (no decoding);
    the pixels to decode (count x width x height from the stream header) checked against `max_pixels`."""
    fmt = sniff_container(fh.read(12))
    if fmt is None:
        raise VideoError("bad_format", f"{name}: not one of {list(FORMATS)}")
    fh.seek(0)
    total, w, h = _count_frames(av, fh, fmt, name, max_frames)
    if total == 0:
        raise VideoError("no_frames", f"{name}: the video stream has no frames")
    indices = sample_indices(total, settings.num_frames, settings.sampling)
    if w * h > DEFAULT_MAX_FRAME_PIXELS or (max(indices) + 1) * w * h > max_pixels:
        raise VideoError("too_many_pixels", f"{name}: {max(indices) + 1} frames of {w}x{h} to decode "
                         f"exceed {max_pixels} pixels")
    return fmt, total, indices


def _corrupt(err, name: str) -> VideoError:
    detail = getattr(err, "strerror", None) or str(err)  # FFmpeg's message without errno and file name
    return VideoError("corrupt", f"{name}: {detail}")


def probe_video(src, settings: VideoSettings = VideoSettings(), max_bytes: int = DEFAULT_MAX_BYTES,
                max_frames: int = DEFAULT_MAX_FRAMES, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[int]:
    """`open_video`'s checks without decoding a frame (format, size, stream, packet count, pixel budget):
    -> the frame indices `open_video` would sample. A dataset runs it before training."""
    av = _import_av()
    name, fh = _open_bytes(src, max_bytes)
    with fh:
        try:
            return _plan(av, fh, name, settings, max_frames, max_pixels)[2]
        except VideoError:
            raise
        except (av.error.FFmpegError, OSError, ValueError, EOFError, IndexError) as err:  # FFmpeg's "corrupt"
            raise _corrupt(err, name) from err


def open_video(src, settings: VideoSettings = VideoSettings(), max_bytes: int = DEFAULT_MAX_BYTES,
               max_frames: int = DEFAULT_MAX_FRAMES, max_pixels: int = DEFAULT_MAX_PIXELS) -> Video:
    """A video (path, bytes or file object) -> its `settings.num_frames` sampled frames, within limits.

    Two passes: the packets are counted (no decoding) to pick the frame indices and check the frame count
    and the pixels to decode (count x width x height from the stream header); then frames are decoded up
    to the last index, every decoded frame's real size counted against `max_pixels`.
    """
    av = _import_av()
    name, fh = _open_bytes(src, max_bytes)
    with fh:
        try:
            fmt, total, indices = _plan(av, fh, name, settings, max_frames, max_pixels)
            fh.seek(0)
            frames = _decode(av, fh, fmt, name, sorted(set(indices)), max_pixels)
        except VideoError:
            raise
        except (av.error.FFmpegError, OSError, ValueError, EOFError, IndexError) as err:  # FFmpeg's "corrupt"
            raise _corrupt(err, name) from err
    return Video([frames[i] for i in indices], indices, total)
