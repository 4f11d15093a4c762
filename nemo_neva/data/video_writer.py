"""Write frames as a video file with PyAV (synthetic data, tests): lossless by default, so the frames read
back are the frames written."""
from __future__ import annotations

import numpy as np

# container -> (codec, pixel format, codec options): lossless RGB in each container this project reads.
LOSSLESS = {"mp4": ("libx264rgb", "rgb24", {"crf": "0"}), "matroska": ("ffv1", "bgr0", {}),
            "avi": ("png", "rgb24", {})}


def write_video(path, frames, fps: int = 10, container: str = "mp4", codec=None, pix_fmt=None) -> None:
    """`frames`: PIL images or uint8 [H, W, 3] arrays of one size. `codec`/`pix_fmt` override the lossless
    choice for `container` (e.g. "mpeg4" / "yuv420p" for a lossy file)."""
    import av

    lossless_codec, lossless_fmt, options = LOSSLESS[container]
    arrays = [np.asarray(f.convert("RGB")) if hasattr(f, "convert") else np.asarray(f, dtype=np.uint8)
              for f in frames]
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec or lossless_codec, rate=fps)
        stream.height, stream.width = (arrays[0].shape[:2] if arrays else (16, 16))
        stream.pix_fmt = pix_fmt or lossless_fmt
        if codec is None:
            stream.options = dict(options)
        out.start_encoding()  # the header, even for a video without frames
        for a in arrays:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")))
        out.mux(stream.encode())  # flush the encoder
