"""`"video"` training samples: where they are read from (`model.data.video_folder`), and
each video -> its `num_frames` sampled frames (`video_io.open_video`) within `model.data.video` limits.

A record's `"video"` is a path or a list of paths; each `<video>` tag of a user turn takes the next one and
becomes `num_frames` `<image>` tags before the conversation is rendered, so every template (`plain` too) keeps
one placeholder run per frame and a sample's length is known without decoding anything.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from nemo_neva.data.image_io import ImageError, ImageSource
from nemo_neva.data.video_io import (DEFAULT_MAX_BYTES, DEFAULT_MAX_FRAMES, DEFAULT_MAX_PIXELS, VideoError,
                                     VideoSettings, open_video, probe_video, video_settings_of)


@dataclass(frozen=True)
class VideoRef:
    """A video in a sample's media list (tag order), beside the image paths (plain strings)."""
    path: str  # relative to the video folder


@dataclass(frozen=True)
class VideoLimits:
    max_bytes: int = DEFAULT_MAX_BYTES  # file size
    max_frames: int = DEFAULT_MAX_FRAMES  # frames in the file (packets counted before decoding)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decoded pixels, all decoded frames together

    def __post_init__(self):
        for key, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.data.video.{key} must be an integer >= 1, got {value!r}")


def video_limits_of(data_cfg) -> VideoLimits:
    """`model.data.video.{max_bytes, max_frames, max_pixels}` (absent: video_io's defaults)."""
    video = (data_cfg.get("video") if data_cfg is not None else None) or {}
    return VideoLimits(max_bytes=video.get("max_bytes", DEFAULT_MAX_BYTES),
                       max_frames=video.get("max_frames", DEFAULT_MAX_FRAMES),
                       max_pixels=video.get("max_pixels", DEFAULT_MAX_PIXELS))


def video_options_of(data_cfg) -> tuple[VideoSettings, VideoLimits]:
    """(num_frames + sampling, limits) of a `model.data` config."""
    return video_settings_of({"data": data_cfg}), video_limits_of(data_cfg)


class VideoSource:
    """Videos under a folder (or inside an uncompressed `.tar`), addressed by relative path like images (the
    same path checks); every failure is a `VideoError` (skip reason `video_<reason>`)."""

    def __init__(self, root: str, settings: VideoSettings = VideoSettings(), limits: VideoLimits = VideoLimits()):
        if not os.path.isdir(root) and not (os.path.isfile(root) and root.endswith(".tar")):
            raise FileNotFoundError(f"video folder not found: {root!r} (model.data.video_folder, default the "
                                    "image_folder)")
        self.files = ImageSource(root, max_bytes=limits.max_bytes)
        self.settings, self.limits = settings, limits

    def _read(self, rel: str):
        try:
            return self.files._read(rel)  # bytes from a tar, or the checked path under the folder
        except VideoError:
            raise
        except ImageError as err:
            raise VideoError(err.reason, err.detail) from err

    def _kw(self) -> dict:
        return dict(settings=self.settings, max_bytes=self.limits.max_bytes, max_frames=self.limits.max_frames,
                    max_pixels=self.limits.max_pixels)

    def check(self, rel: str) -> None:
        """Format, size, stream, frame count and pixel budget, without decoding (the dataset's prescan)."""
        probe_video(self._read(rel), **self._kw())

    def load(self, rel: str) -> list:
        """The `num_frames` sampled frames (PIL RGB), in order."""
        return open_video(self._read(rel), **self._kw()).frames
