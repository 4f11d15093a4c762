"""OpenAI-compatible HTTP server for a NeVA model (`examples/neva_serve.py`).

Where things happen: `limits.py` (configured request limits), `chat_request.py` (JSON body -> validated
`ChatRequest`), `images.py` (`data:` URL -> checked PIL image), `worker.py` (the one thread that runs the
model; token counts and finish reasons come from the decoding loop, `inference.generate.Usage`),
`openai_format.py` (response / stream chunk objects), `http_server.py` (routes, SSE, errors).
"""
from nemo_neva.serving.http_server import build_server
from nemo_neva.serving.limits import ServerLimits

__all__ = ["build_server", "ServerLimits"]
