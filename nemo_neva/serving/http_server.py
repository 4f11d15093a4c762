"""HTTP side: routes, body limits, JSON errors and server-sent events, on the stdlib threading server.

One thread per connection parses and validates (images included) concurrently; generation itself is
handed to the single `GenerationWorker`. Client mistakes get an OpenAI-style error JSON (400); anything
else gets a generic 500 while the log keeps the trace.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from nemo_neva.serving import openai_format as fmt
from nemo_neva.serving.chat_request import parse_chat_request
from nemo_neva.serving.errors import RequestError, internal_error
from nemo_neva.serving.limits import ServerLimits
from nemo_neva.serving.worker import GenerationWorker

log = logging.getLogger("nemo_neva.serving")
DRAIN_BYTES = 4 * 1024 * 1024


class ServingState:
    def __init__(self, worker: GenerationWorker, template: str, limits: ServerLimits, model_id: str):
        self.worker, self.template, self.limits, self.model_id = worker, template, limits, model_id
        self.created = int(time.time())
        self.slots = threading.BoundedSemaphore(limits.max_pending)


class ChatHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for JSON replies, chunked transfer for streams
    server_version = "nemo-neva"
    sys_version = ""

    @property
    def state(self) -> ServingState:
        return self.server.state

    def setup(self):
        self.timeout = self.server.state.limits.request_timeout_s  # slow or idle clients do not pin a thread
        super().setup()

    def log_message(self, fmt_, *args):
        log.info("%s %s", self.address_string(), fmt_ % args)

    # ------------------------------------------------------------------------------------------ replies
    def _send_json(self, status: int, obj: dict, close: bool = False) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: RequestError, close: bool = False) -> None:
        log.info("refused %s %s: %s", self.command, self.path, err.message)
        self._send_json(err.status, err.body(), close)

    def _event(self, obj) -> None:
        data = ("data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n").encode()
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    # ------------------------------------------------------------------------------------------ routes
    def do_GET(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            ok = self.state.worker.alive()
            self._send_json(200 if ok else 503, {"status": "ok" if ok else "generation worker stopped",
                                                 "model": self.state.model_id})
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [fmt.model_card(self.state.model_id,
                                                                             self.state.created)]})
        elif path == f"/v1/models/{self.state.model_id}":
            self._send_json(200, fmt.model_card(self.state.model_id, self.state.created))
        else:
            self._send_error(RequestError(f"no route GET {path}", status=404, code="not_found"))

    def do_POST(self):
        self._unread = 0
        if self.path.split("?", 1)[0].rstrip("/") != "/v1/chat/completions":
            self._send_error(RequestError(f"no route POST {self.path[:100]}", status=404, code="not_found"),
                             close=True)
            return
        if not self.state.slots.acquire(blocking=False):
            self._send_error(RequestError("server busy: too many requests in progress, retry later", status=503,
                                          kind="server_error", code="overloaded"), close=True)
            return
        try:
            self._chat()
        except RequestError as e:
            self._send_error(e, close=e.close)
            if self._unread:
                self._discard(min(self._unread, DRAIN_BYTES))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception:
            log.exception("request failed")
            self._send_error(internal_error(), close=True)
        finally:
            self.state.slots.release()

    # ------------------------------------------------------------------------------------------ chat
    def _read_json(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError("chunked request bodies are not accepted; send a Content-Length", close=True)
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            raise RequestError("a valid Content-Length header is required", close=True) from None
        if length > self.state.limits.max_body_bytes:
            self._unread = length  # not parsed; see _discard
            raise RequestError(f"request body of {length} bytes exceeds the limit of "
                               f"{self.state.limits.max_body_bytes} bytes", code="body_too_large", close=True)
        raw = self.rfile.read(length)
        if len(raw) != length:
            raise ConnectionResetError("client closed the connection mid-body")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):  # bad UTF-8 / JSON, huge int literals, absurd nesting
            raise RequestError("request body is not valid JSON") from None

    def _discard(self, n: int) -> None:
        """After refusing an oversized body: read and drop up to `n` bytes, so that a client still sending
        it gets to read the reply instead of a connection reset; the connection then closes."""
        self.connection.settimeout(2.0)
        try:
            while n > 0:
                got = self.rfile.read(min(n, 65536))
                if not got:
                    return
                n -= len(got)
        except OSError:  # timeout or reset: the reply below may still reach the client
            pass

    def _chat(self):
        body = self._read_json()
        req = parse_chat_request(body, self.state.limits, self.state.template, self.state.model_id)
        job = self.state.worker.submit(req)
        kind, payload = job.events.get()
        if kind == "error":
            raise payload
        cid = fmt.completion_id()
        if not req.stream:
            assert kind == "done"
            self._send_json(200, fmt.completion(cid, self.state.model_id, payload))
            return
        try:
            self._stream(job, cid, kind, payload, req.include_usage)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            job.cancelled.set()
            self.close_connection = True

    def _stream(self, job, cid, kind, payload, include_usage):
        model_id = self.state.model_id
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._event(fmt.chunk(cid, model_id, {"role": "assistant", "content": ""}))
        while True:
            if kind == "delta":
                self._event(fmt.chunk(cid, model_id, {"content": payload}))
            elif kind == "done":
                self._event(fmt.chunk(cid, model_id, {}, payload.finish_reason))
                if include_usage:
                    self._event(fmt.usage_chunk(cid, model_id, payload))
                break
            else:  # failed after the headers went out: an error event, as OpenAI sends one
                self._event(payload.body())
                break
            kind, payload = job.events.get()
        self._event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class NevaHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, state: ServingState):
        self.state = state
        super().__init__(address, ChatHandler)

    def server_close(self):
        super().server_close()
        self.state.worker.stop()


def build_server(model, template: str, limits: ServerLimits, host: str = "127.0.0.1", port: int = 8000,
                 model_id: str = "neva") -> NevaHTTPServer:
    """A ready server (worker thread started); call `serve_forever()` and, at the end, `server_close()`."""
    worker = GenerationWorker(model, template, limits.max_tokens).start()
    try:
        return NevaHTTPServer((host, port), ServingState(worker, template, limits, model_id))
    except OSError:
        worker.stop()
        raise
