"""OpenAI-compatible HTTP server for a NeVA model (`examples/neva_serve.py`).

Where things happen: `limits.py` (configured request limits), `chat_request.py` (JSON body -> validated
`ChatRequest`), `images.py` (`data:` URL -> checked PIL image), `worker.py` (the one thread that runs the
model; `token_count.py` counts what it sampled), `openai_format.py` (response / stream chunk objects),
`http_server.py` (routes, SSE, errors).
"""
from nemo_neva.serving.http_server import build_server
from nemo_neva.serving.limits import ServerLimits

__all__ = ["build_server", "ServerLimits"]
