"""OpenAI-compatible HTTP server for a NeVA model (`examples/neva_serve.py`).

Where things happen: `limits.py` (configured request limits), `chat_request.py` (JSON body -> validated
`ChatRequest`), `images.py` (`data:` URL -> checked PIL image), `worker.py` (the one thread that runs the
model; token counts and finish reasons come from the decoding loop, `inference.generate.Usage`),
`openai_format.py` (response / stream chunk objects), `http_server.py` (routes, SSE, errors).

Triton (`examples/neva_triton.py`): `triton_model.py` (NeMo 1's multimodal request tensors -> checked rows ->
batched generation), `triton_server.py` (PyTriton: endpoints, dynamic batcher, shutdown), `triton_env.py`
(libpython and the NumPy-1 stub environment PyTriton needs), `triton_trtllm.py` (TensorRT engines, GPU).
`limits.py` (ranges, context budget) and `images.py` are shared by both servers.
"""
from nemo_neva.serving.http_server import build_server
from nemo_neva.serving.limits import ServerLimits

__all__ = ["build_server", "ServerLimits"]
