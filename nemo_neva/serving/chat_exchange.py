"""The chat endpoint at the ASGI level (`ChatExchange`), where HTTP details matter: the request takes its slot
before its body is read (more than `max_pending` in progress get a 503), Content-Length is checked before
reading, a refused body is drained after the answer (the client reads it instead of a connection reset), a
stalled body past `request_timeout_s` drops the connection, and a stream's generation stops when its client
goes away. `ServingState` is what the app's routes share; `_LoopEvents` brings the worker's events back to
the event loop."""
from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from nemo_neva.data.video_io import video_settings_of
from nemo_neva.serving import openai_format as fmt
from nemo_neva.serving.chat_request import parse_chat_request
from nemo_neva.serving.errors import RequestError, internal_error
from nemo_neva.serving.limits import ServerLimits
from nemo_neva.serving.worker import GenerationWorker

log = logging.getLogger(__name__)
DRAIN_BYTES = 4 * 1024 * 1024  # of a refused body, read and dropped after the reply
DRAIN_TIMEOUT_S = 2.0


class ServingState:
    def __init__(self, worker: GenerationWorker, template: str, limits: ServerLimits, model_id: str):
        self.worker, self.template, self.limits, self.model_id = worker, template, limits, model_id
        self.video = video_settings_of(worker.model.cfg)  # frames sampled per video_url part, as in training
        self.created = int(time.time())
        self.pending = 0  # requests in progress; only touched on the event loop
        self.abort_connection = None  # set by NevaServer: scope -> close that client's connection, no reply


class _Stalled(Exception):
    """The client stopped sending its body for request_timeout_s."""


class _Gone(Exception):
    """The client disconnected."""


class _LoopEvents:
    """A job's event queue (`put` from the worker thread, `get` on the event loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop, self._queue = loop, asyncio.Queue()

    def put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the server's loop is gone (shutdown): nobody is waiting any more
            pass

    async def get(self):
        return await self._queue.get()


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class ChatExchange(Response):
    """One POST /v1/chat/completions, from its headers to the last byte of its reply."""

    def __init__(self, state: ServingState):
        super().__init__()
        self.state = state
        self.body_read = False  # else a refusal drains it
        self.started = False    # the reply's headers went out

    async def __call__(self, scope, receive, send) -> None:
        state = self.state
        if state.pending >= state.limits.max_pending:
            await self._refuse(scope, receive, send, RequestError(
                "server busy: too many requests in progress, retry later", status=503, kind="server_error",
                code="overloaded", close=True))
            return
        state.pending += 1
        job, gone = None, None
        try:
            raw = await self._read_body(scope, receive)
            req = await run_in_threadpool(self._parse, raw)
            gone = asyncio.ensure_future(self._disconnect(receive))
            events = _LoopEvents(asyncio.get_running_loop())
            job = state.worker.submit(req, events=events)
            kind, payload = await self._next(events, gone)
            if kind == "error":
                raise payload
            cid = fmt.completion_id()
            if not req.stream:
                await self._send_json(send, 200, fmt.completion(cid, state.model_id, payload))
            else:
                await self._stream(send, events, gone, cid, kind, payload, req.include_usage)
        except RequestError as e:
            await self._refuse(scope, receive, send, e)
        except _Stalled:
            log.info("dropped %s: its request body stalled for %ss", scope["client"], state.limits.request_timeout_s)
            if state.abort_connection is None:
                raise
            state.abort_connection(scope)
            await receive()  # the disconnect: uvicorn then sends nothing
        except _Gone:
            pass
        except Exception:
            if self.started:
                raise  # uvicorn logs it and closes the connection
            log.exception("request failed")
            await self._refuse(scope, receive, send, RequestError(internal_error().message, status=500,
                                                                  kind="server_error", close=True))
        finally:
            state.pending -= 1
            if job is not None:
                job.cancelled.set()  # no-op once done; stops a generation whose client went away
            if gone is not None:
                gone.cancel()

    # ------------------------------------------------------------------------------------------ request
    async def _read_body(self, scope, receive) -> bytes:
        limits = self.state.limits
        if "chunked" in (_header(scope, b"transfer-encoding") or "").lower():
            raise RequestError("chunked request bodies are not accepted; send a Content-Length", close=True)
        try:
            length = int(_header(scope, b"content-length") or "")
            if length < 0:
                raise ValueError
        except ValueError:
            raise RequestError("a valid Content-Length header is required", close=True) from None
        if length > limits.max_body_bytes:
            raise RequestError(f"request body of {length} bytes exceeds the limit of {limits.max_body_bytes} bytes",
                               code="body_too_large", close=True)
        parts, more = [], True
        while more:
            try:
                message = await asyncio.wait_for(receive(), limits.request_timeout_s)
            except asyncio.TimeoutError:
                raise _Stalled from None
            if message["type"] == "http.disconnect":
                raise _Gone
            parts.append(message.get("body", b""))
            more = message.get("more_body", False)
        self.body_read = True
        return b"".join(parts)

    def _parse(self, raw: bytes):
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # bad UTF-8 / JSON, huge int literals, absurd nesting
            raise RequestError("request body is not valid JSON") from None
        state = self.state
        return parse_chat_request(body, state.limits, state.template, state.model_id, state.video)

    @staticmethod
    async def _disconnect(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    @staticmethod
    async def _next(events: _LoopEvents, gone: asyncio.Future):
        get = asyncio.ensure_future(events.get())
        await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
        if get.done():
            return get.result()
        get.cancel()
        raise _Gone

    # ------------------------------------------------------------------------------------------ replies
    @staticmethod
    async def _send_json(send, status: int, obj: dict, close: bool = False, more_body: bool = False) -> None:
        data = json.dumps(obj).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data, "more_body": more_body})

    async def _refuse(self, scope, receive, send, err: RequestError) -> None:
        log.info("refused %s %s: %s", scope["method"], scope["path"], err.message)
        if not err.close or self.body_read:
            await self._send_json(send, err.status, err.body(), close=err.close)
            return
        # The body was not read. Answer in full, then read and drop what the client still sends (bounded),
        # and only then close: closing on unread data would reset the connection under the client's feet.
        await self._send_json(send, err.status, err.body(), close=True, more_body=True)
        left = DRAIN_BYTES
        while left > 0:
            try:
                message = await asyncio.wait_for(receive(), DRAIN_TIMEOUT_S)
            except asyncio.TimeoutError:
                break
            if message["type"] == "http.disconnect":
                break
            left -= len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream(self, send, events, gone, cid, kind, payload, include_usage) -> None:
        model_id = self.state.model_id

        async def event(obj) -> None:
            if gone.done():
                raise _Gone
            data = "data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n"
            await send({"type": "http.response.body", "body": data.encode(), "more_body": True})

        self.started = True
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        await event(fmt.chunk(cid, model_id, {"role": "assistant", "content": ""}))
        while True:
            if kind == "delta":
                await event(fmt.chunk(cid, model_id, {"content": payload}))
            elif kind == "done":
                await event(fmt.chunk(cid, model_id, {}, payload.finish_reason))
                if include_usage:
                    await event(fmt.usage_chunk(cid, model_id, payload))
                break
            else:  # failed after the headers went out: an error event, as OpenAI sends one
                await event(payload.body())
                break
            kind, payload = await self._next(events, gone)
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
