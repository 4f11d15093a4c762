"""Videos in requests: inline `data:video/...;base64,` URLs (HTTP server), decoded with
`data.video_io.open_video` within the `server.max_video_*` limits and sampled as the model's own
`model.data.video` settings say (the frames its training used).

As for images, the server never fetches a URL or opens a path a client names. The byte size is checked
from the base64 length, the frame count from the file's packets and the pixels from the stream header,
all before any frame is decoded; a refusal is one line with a reason code, never a PyAV trace.
"""
from __future__ import annotations

from nemo_neva.data.video_io import Video, VideoError, VideoSettings, open_video
from nemo_neva.serving.errors import RequestError
from nemo_neva.serving.images import data_url_bytes
from nemo_neva.serving.limits import ServerLimits

# VideoError.reason -> the error code a client gets; anything else is "bad_video" (not a video we can read)
_CODES = {"too_large": "video_too_large", "too_many_frames": "video_too_many_frames",
          "too_many_pixels": "video_too_many_pixels"}


def video_from_url(url, limits: ServerLimits, settings: VideoSettings, param: str) -> Video:
    """A `video_url.url` -> its sampled frames (a `Video`, `settings.num_frames` of them), or a RequestError."""
    data = data_url_bytes(url, limits.max_video_bytes, param, kind="video", example="video/mp4")
    try:
        return open_video(data, settings, max_bytes=limits.max_video_bytes, max_frames=limits.max_video_frames,
                          max_pixels=limits.max_video_pixels)
    except VideoError as e:
        # open_video names its source "<bytes>" here: drop that, keep FFmpeg's reason (first line only)
        detail = e.detail.replace("'<bytes>': ", "").replace("<bytes>: ", "").splitlines()
        raise RequestError(f"video refused: {detail[0] if detail else e.reason}", param,
                           code=_CODES.get(e.reason, "bad_video")) from None
