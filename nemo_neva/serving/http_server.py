"""HTTP side: FastAPI routes on uvicorn; body limits, JSON errors, server-sent events and the chat page.

Everything runs on one asyncio event loop; parsing and validation (images included) run in a thread pool, so
requests are still checked concurrently, and generation is handed to the single `GenerationWorker`, whose
events come back to the loop through `_LoopEvents`. Client mistakes get an OpenAI-style error JSON (400);
anything else gets a generic 500 while the log keeps the trace.

The chat endpoint talks ASGI directly (`ChatExchange`, chat_exchange.py) where HTTP details matter; FastAPI
does the routing, the other routes and the OpenAPI document.
"""
from __future__ import annotations

import logging
import socket
import threading
from importlib import resources

import asyncio
import re

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from nemo_neva.data.conversation import STEERLM_INFERENCE_DEFAULTS, get_template
from nemo_neva.serving import api_schema as schema
from nemo_neva.serving import openai_format as fmt
from nemo_neva.serving.chat_exchange import ChatExchange, ServingState
from nemo_neva.serving.chat_request import parse_chat_request
from nemo_neva.serving.errors import RequestError, internal_error
from nemo_neva.serving.limits import ServerLimits
from nemo_neva.serving.worker import GenerationWorker

log = logging.getLogger(__name__)
BACKLOG = 2048  # listen queue: a burst of clients waits to be accepted instead of being reset
GRACEFUL_SHUTDOWN_S = 5
SERVER_HEADER = "nemo-neva"
PAGE_FILES = {"chat.js": "text/javascript; charset=utf-8", "attach.js": "text/javascript; charset=utf-8",
              "chat.css": "text/css; charset=utf-8"}
# The page loads nothing from anywhere but this server (attached images and videos are data: URLs).
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; media-src data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# ---------------------------------------------------------------------------------------------- the app
def _error_response(err: RequestError, headers=None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _page_asset(name: str) -> bytes:
    return resources.files("nemo_neva.serving").joinpath("page", name).read_bytes()


def server_config(state: ServingState) -> dict:
    """GET /config: the model, the sampling defaults a request without parameters gets, the limits, and the
    SteerLM attributes with their defaults (null unless the template has them)."""
    probe = parse_chat_request({"model": state.model_id, "messages": [{"role": "user", "content": "x"}]},
                               state.limits, state.template, state.model_id)
    limits = state.limits
    return {
        "model": state.model_id, "template": state.template,
        "defaults": {"temperature": probe.temperature, "top_p": probe.top_p, "top_k": probe.top_k,
                     "max_tokens": probe.max_tokens, "seed": probe.seed},
        "limits": {k: getattr(limits, k) for k in schema.PageLimits.model_fields},
        "steerlm": dict(STEERLM_INFERENCE_DEFAULTS) if get_template(state.template).steerlm else None,
    }


def create_app(state: ServingState) -> FastAPI:
    """The ASGI app: the OpenAI-compatible API, /health, /config, /openapi.json and the chat page at /."""
    app = FastAPI(title="nemo-neva", version="0.1.0", docs_url=None, redoc_url=None, redirect_slashes=False,
                  description="OpenAI-compatible chat completions for a NeVA model, and a chat page at /.")
    page = {name: _page_asset(name) for name in ["index.html", *PAGE_FILES]}
    config = server_config(state)
    page_headers = {"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_CSP,
                    "X-Content-Type-Options": "nosniff"}

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        path = request.url.path[:100]
        if exc.status_code == 404:
            err = RequestError(f"no route {request.method} {path}", status=404, code="not_found")
        elif exc.status_code == 405:
            err = RequestError(f"method {request.method} is not allowed on {path}", status=405,
                               code="method_not_allowed")
        else:
            err = RequestError(str(exc.detail), status=exc.status_code, code=None)
        return _error_response(err, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error_response(RequestError("invalid request"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.error("request failed", exc_info=exc)
        return _error_response(internal_error())

    @app.post("/v1/chat/completions", response_model=None, summary="Create a chat completion",
              responses={200: {"model": schema.ChatCompletion, "description": "the answer; with `stream: true`, "
                               "`text/event-stream` of `chat.completion.chunk` objects then `data: [DONE]`",
                               "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                         **schema.ERRORS},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}})
    async def chat_completions() -> Response:
        return ChatExchange(state)

    @app.get("/v1/models", response_model=schema.ModelList, summary="The served model")
    async def models():
        return {"object": "list", "data": [fmt.model_card(state.model_id, state.created)]}

    @app.get("/v1/models/{model}", response_model=schema.ModelCard, summary="One model",
             responses={404: schema.ERRORS[404]})
    async def model(model: str):
        if model != state.model_id:
            return _error_response(RequestError(f"model {model!r} is not served here; this server serves "
                                                f"{state.model_id!r}", "model", status=404, code="model_not_found"))
        return fmt.model_card(state.model_id, state.created)

    @app.get("/health", response_model=schema.Health, summary="Liveness of the generation worker",
             responses={503: {"model": schema.Health, "description": "the generation worker stopped"}})
    async def health():
        ok = state.worker.alive()
        return JSONResponse({"status": "ok" if ok else "generation worker stopped", "model": state.model_id},
                            status_code=200 if ok else 503)

    @app.get("/config", response_model=schema.ServerConfig, summary="Defaults and limits, for the chat page")
    async def get_config():
        return config

    @app.get("/", include_in_schema=False)
    async def index():
        return Response(page["index.html"], media_type="text/html; charset=utf-8", headers=page_headers)

    @app.get("/page/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in PAGE_FILES:
            raise StarletteHTTPException(404)
        return Response(page[name], media_type=PAGE_FILES[name], headers=page_headers)

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            doc["components"]["schemas"].update(
                schema.request_schemas(state.model_id, state.limits, config["steerlm"] is not None))
            for path in doc["paths"].values():  # no body or parameter here can fail FastAPI's own validation
                for operation in path.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                doc["components"]["schemas"].pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
    return app


class _StripTrailingSlash:
    """`/health/` is `/health` (as the stdlib server had it), instead of a redirect."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and len(scope["path"]) > 1 and scope["path"].endswith("/"):
            scope = dict(scope, path=scope["path"].rstrip("/") or "/")
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------- the server
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)[ \t]*\r\n", re.IGNORECASE)
MAX_HEAD_BYTES = 64 * 1024  # h11's own limit for an incomplete head; past it uvicorn answers 431 and closes


class _HeadTimeout(asyncio.Protocol):
    """Wraps uvicorn's HTTP protocol (whatever `http=` class uvicorn picks) without reaching into it: a
    connection that has not sent a complete request head within `head_timeout_s` of connecting, or of starting
    its next request, is closed, so slow or idle clients cannot pile up (uvicorn only times out idle keep-alive
    connections after a response). It follows the bytes itself: heads end at CRLFCRLF and bodies are
    Content-Length long (chunked bodies are refused before they are read). Open connections are kept in
    `registry` (client address -> transport) for `NevaServer._abort`."""

    head_timeout_s = 60.0
    inner_class: type = None
    registry: dict = None

    def __init__(self, *args, **kwargs):
        self._inner = self.inner_class(*args, **kwargs)
        self._timer = None
        self._head = b""            # bytes of a request head still being received
        self._body_left = 0         # body bytes of the current request still to come
        self._transport = None

    def connection_made(self, transport):
        self._transport = transport
        self._client = transport.get_extra_info("peername")
        if self._client is not None:
            self.registry[tuple(self._client[:2])] = transport
        self._inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)
        self._follow(data)

    def connection_lost(self, exc):
        self._cancel()
        if self._client is not None:
            self.registry.pop(tuple(self._client[:2]), None)
        self._inner.connection_lost(exc)

    def eof_received(self):
        return self._inner.eof_received()

    def pause_writing(self):
        self._inner.pause_writing()

    def resume_writing(self):
        self._inner.resume_writing()

    def _follow(self, data: bytes) -> None:
        while data:
            if self._body_left:
                taken = min(self._body_left, len(data))
                self._body_left -= taken
                data = data[taken:]
                continue
            if not self._head and self._timer is None:
                self._arm()  # the first byte of the next request starts its clock
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                self._head = self._head[-MAX_HEAD_BYTES:]
                return
            head, data = self._head[:end + 2], self._head[end + 4:]
            self._head = b""
            self._cancel()
            match = _CONTENT_LENGTH.search(head)
            self._body_left = int(match.group(1)) if match else 0

    def _arm(self):
        self._cancel()
        if not self._transport.is_closing():
            self._timer = asyncio.get_running_loop().call_later(self.head_timeout_s, self._transport.close)

    def _cancel(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class NevaServer:
    """uvicorn on a socket bound at construction (so `server_address` is known before serving, port 0
    included), with the stdlib server's surface: `serve_forever()`, `shutdown()` from another thread,
    `server_close()` at the end (which also stops the generation worker)."""

    def __init__(self, state: ServingState, sock: socket.socket, backlog: int = BACKLOG):
        self.state, self.socket = state, sock
        self.server_address = sock.getsockname()[:2]
        self.app = _StripTrailingSlash(create_app(state))
        settings = dict(ws="none", loop="asyncio", lifespan="off", log_config=None, backlog=backlog,
                        timeout_keep_alive=5, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, proxy_headers=False,
                        server_header=False, headers=[("server", SERVER_HEADER)])
        h11 = uvicorn.Config(self.app, http="h11", **settings)
        h11.load()  # resolves `http` to uvicorn's protocol class, which the wrapper then drives
        self._connections = {}
        protocol = type("NevaHttpProtocol", (_HeadTimeout,), {
            "head_timeout_s": state.limits.request_timeout_s, "inner_class": h11.http_protocol_class,
            "registry": self._connections})
        self._uvicorn = uvicorn.Server(uvicorn.Config(self.app, http=protocol, **settings))
        self._running = threading.Event()
        self._stopped = threading.Event()
        state.abort_connection = self._abort

    def _abort(self, scope) -> None:
        transport = self._connections.get(tuple(scope.get("client") or ()))
        if transport is not None:
            transport.close()

    def serve_forever(self) -> None:
        self._running.set()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serving (in-flight replies get GRACEFUL_SHUTDOWN_S to finish); returns once serving stopped."""
        self._uvicorn.should_exit = True
        if self._running.is_set():
            self._stopped.wait()

    def server_close(self) -> None:
        self.socket.close()
        self.state.worker.stop()


def build_server(model, template: str, limits: ServerLimits, host: str = "127.0.0.1", port: int = 8000,
                 model_id: str = "neva", backlog: int = BACKLOG) -> NevaServer:
    """A ready server (worker thread started); call `serve_forever()` and, at the end, `server_close()`."""
    worker = GenerationWorker(model, template, limits.max_tokens).start()
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            return NevaServer(ServingState(worker, template, limits, model_id), sock, backlog)
        except BaseException:
            sock.close()
            raise
    except BaseException:
        worker.stop()
        raise
