"""Pieces shared by the serving tests: served-model handle, images as data: URLs, small video files."""
import base64
import contextlib
import io
import threading
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from nemo_neva import MegatronNevaModel
from nemo_neva.data.video_writer import write_video

TEMPLATE = "nv_steerlm"
LIMITS = {"max_tokens": 12, "max_body_bytes": 300_000, "max_image_bytes": 60_000, "max_image_pixels": 1_000_000,
          "max_text_chars": 4000, "max_messages": 8, "max_images": 3}


@dataclass
class Served:
    url: str
    model_id: str
    model: MegatronNevaModel  # the same weights, in this process: the oracle
    log_path: str

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def coloured(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def moving_square(n, size=32):
    """`n` frames of a red square moving left to right on light grey."""
    frames = []
    for i in range(n):
        a = np.full((size, size, 3), 245, np.uint8)
        x = round(i * (size - 8) / max(n - 1, 1))
        a[12:20, x:x + 8] = (220, 30, 30)
        frames.append(Image.fromarray(a))
    return frames


def noise_frames(n, size=48, seed=0):
    """`n` frames of uniform noise: incompressible, so a losslessly coded file is about n * size * size * 3 bytes."""
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def video_bytes(tmp_path, frames, name="clip.mp4") -> bytes:
    """`frames` written losslessly as the mp4 `tmp_path / name`; its bytes."""
    path = tmp_path / name
    write_video(path, frames)
    return path.read_bytes()


@contextlib.contextmanager
def running_server(model, template=TEMPLATE, model_id="m", **limits):
    """An in-process server on a free loopback port (sharing `model`); yields its base URL."""
    from nemo_neva.serving import ServerLimits, build_server

    server = build_server(model, template, ServerLimits(**limits), port=0, model_id=model_id)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)
