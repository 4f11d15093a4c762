"""Overload, slow clients and internal failures, on an in-process server sharing the oracle model's weights."""
import http.client
import json
import socket
import threading
import time

import openai
import pytest

from nemo_neva.serving import ServerLimits, build_server
from nemo_neva.serving import worker as worker_module
from tests.serving.serving_helpers import TEMPLATE


@pytest.fixture
def small_server(served):
    server = build_server(served.model, TEMPLATE, ServerLimits(max_pending=1, request_timeout_s=3.0, max_tokens=4),
                          port=0, model_id="m")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _half_sent_request(port):
    """A request whose body never finishes: it holds its slot until the read times out."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mo")
    return s


def _client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)


def test_requests_beyond_max_pending_get_503_and_slow_clients_time_out(small_server):
    slow = _half_sent_request(small_server)
    time.sleep(0.8)  # let the server take the slot (it reads the headers first)
    with pytest.raises(openai.InternalServerError) as err:
        _client(small_server).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 503 and err.value.body["code"] == "overloaded"
    slow.settimeout(10)
    assert slow.recv(100) == b""  # the server dropped the stalled connection after request_timeout_s
    slow.close()
    time.sleep(0.2)
    reply = _client(small_server).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                         temperature=0)
    assert reply.usage.completion_tokens <= 4


def test_internal_failure_is_a_generic_500_without_details(small_server, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret detail /etc/shadow")

    monkeypatch.setattr(worker_module, "generate_usage", broken)
    conn = http.client.HTTPConnection("127.0.0.1", small_server, timeout=60)
    conn.request("POST", "/v1/chat/completions",
                 body=json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
    resp = conn.getresponse()
    body = resp.read().decode()
    assert resp.status == 500 and json.loads(body)["error"]["type"] == "server_error"
    assert "secret" not in body and "Traceback" not in body
    assert any("secret detail" in (r.exc_text or "") for r in caplog.records)  # the log keeps the cause
