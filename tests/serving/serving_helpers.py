"""Pieces shared by the serving tests: served-model handle, images as data: URLs."""
import base64
import contextlib
import io
import threading
from dataclasses import dataclass

import torch
from PIL import Image

from nemo_neva import MegatronNevaModel

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
