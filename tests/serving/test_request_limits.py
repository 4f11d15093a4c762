"""Every request limit and malformed request is an HTTP 400 with an OpenAI-style error, never a trace."""
import base64
import http.client
import io
import json

import openai
import pytest
from PIL import Image

from tests.serving.serving_helpers import LIMITS, coloured, png_data_url


def _image_msg(url, text="What is it?"):
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": url}}]}


def _png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _bomb_url():
    # 4 megapixels of one grey value: a few KB compressed, far beyond the 1 MP limit once decoded.
    data = _png_bytes(Image.new("L", (2000, 2000), 7))
    assert len(data) < LIMITS["max_image_bytes"]
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _big_png_url():
    noise = Image.effect_noise((200, 200), 120).convert("RGB")  # incompressible: > max_image_bytes
    data = _png_bytes(noise)
    assert LIMITS["max_image_bytes"] < len(data) and 200 * 200 < LIMITS["max_image_pixels"]
    return "data:image/png;base64," + base64.b64encode(data).decode()


OK = [{"role": "user", "content": "hi"}]
CASES = {
    "remote_http_url": dict(messages=[_image_msg("http://169.254.169.254/latest/meta-data")]),
    "remote_https_url": dict(messages=[_image_msg("https://example.com/cat.png")]),
    "local_path": dict(messages=[_image_msg("/etc/passwd")]),
    "file_url": dict(messages=[_image_msg("file:///etc/passwd")]),
    "not_base64": dict(messages=[_image_msg("data:image/png;base64,@@@@")]),
    "not_an_image": dict(messages=[_image_msg("data:image/png;base64," + base64.b64encode(b"hello" * 20).decode())]),
    "image_bytes": dict(messages=[_image_msg(_big_png_url())]),
    "image_pixels_bomb": dict(messages=[_image_msg(_bomb_url())]),
    "too_many_images": dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(coloured(k))}}
        for k in range(LIMITS["max_images"] + 1)]}]),
    "image_tag_in_text": dict(messages=[{"role": "user", "content": "look: <image>"}]),
    "max_tokens_over_cap": dict(messages=OK, max_tokens=LIMITS["max_tokens"] + 1),
    "max_tokens_zero": dict(messages=OK, max_tokens=0),
    "temperature_negative": dict(messages=OK, temperature=-0.5),
    "temperature_too_high": dict(messages=OK, temperature=2.5),
    "top_p_zero": dict(messages=OK, top_p=0.0),
    "top_p_above_one": dict(messages=OK, top_p=1.5),
    "seed_negative": dict(messages=OK, seed=-1),
    "n_two": dict(messages=OK, n=2),
    "too_many_stops": dict(messages=OK, stop=["a", "b", "c", "d", "e"]),
    "unsupported_parameter": dict(messages=OK, tools=[{"type": "function", "function": {"name": "f"}}]),
    "empty_messages": dict(messages=[]),
    "unknown_role": dict(messages=[{"role": "tool", "content": "x"}]),
    "assistant_first": dict(messages=[{"role": "assistant", "content": "x"}, *OK]),
    "ends_with_assistant": dict(messages=[*OK, {"role": "assistant", "content": "x"}]),
    "content_not_text": dict(messages=[{"role": "user", "content": 42}]),
    "too_many_messages": dict(messages=[*([*OK, {"role": "assistant", "content": "x"}] * 4), *OK]),
    "text_too_long": dict(messages=[{"role": "user", "content": "a" * (LIMITS["max_text_chars"] + 1)}]),
    "steerlm_out_of_range": dict(messages=OK, extra_body={"steerlm": {"quality": 11}}),
    "steerlm_unknown_name": dict(messages=OK, extra_body={"steerlm": {"sarcasm": 3}}),
    "context_exceeded": dict(messages=[{"role": "user", "content": "word " * 700}], max_tokens=12),
}

# The field each refusal must name.
PARAM = {
    "assistant_first": "messages[0].role",
    "content_not_text": "messages[0].content",
    "context_exceeded": "messages",
    "empty_messages": "messages",
    "ends_with_assistant": "messages",
    "file_url": "messages[0].content[1]",
    "image_bytes": "messages[0].content[1]",
    "image_pixels_bomb": "messages[0].content[1]",
    "image_tag_in_text": "messages[0]",
    "local_path": "messages[0].content[1]",
    "max_tokens_over_cap": "max_tokens",
    "max_tokens_zero": "max_tokens",
    "n_two": "n",
    "not_an_image": "messages[0].content[1]",
    "not_base64": "messages[0].content[1]",
    "remote_http_url": "messages[0].content[1]",
    "remote_https_url": "messages[0].content[1]",
    "seed_negative": "seed",
    "steerlm_out_of_range": "steerlm",
    "steerlm_unknown_name": "steerlm",
    "temperature_negative": "temperature",
    "temperature_too_high": "temperature",
    "text_too_long": "messages[0]",
    "too_many_messages": "messages",
    "too_many_stops": "stop",
    "top_p_above_one": "top_p",
    "top_p_zero": "top_p",
    "too_many_images": "messages",
    "unknown_role": "messages[0].role",
    "unsupported_parameter": "tools",
}

CODE = {"context_exceeded": "context_length_exceeded", "file_url": "local_path_refused",
        "local_path": "local_path_refused",
        "image_bytes": "image_too_large", "image_pixels_bomb": "image_too_many_pixels", "not_an_image": "bad_image",
        "max_tokens_over_cap": "max_tokens_too_large", "remote_http_url": "remote_url_refused",
        "remote_https_url": "remote_url_refused", "text_too_long": "prompt_too_long", "too_many_messages":
        "too_many_messages", "too_many_images": "too_many_images"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_with_400(served, case):
    with pytest.raises(openai.BadRequestError) as err:
        served.client().chat.completions.create(model=served.model_id, **CASES[case])
    body = err.value.body
    assert err.value.status_code == 400 and body["type"] == "invalid_request_error" and body["message"]
    assert body["param"] == PARAM[case] and body["code"] == CODE.get(case)  # refused for the case's reason
    assert "Traceback" not in json.dumps(body) and "site-packages" not in json.dumps(body)


def test_remote_url_is_never_fetched_and_says_why(served):
    with pytest.raises(openai.BadRequestError) as err:
        served.client().chat.completions.create(model=served.model_id, **CASES["remote_http_url"])
    assert err.value.body["code"] == "remote_url_refused" and "data: URL" in err.value.body["message"]


def test_unknown_model_is_404(served):
    with pytest.raises(openai.NotFoundError):
        served.client().chat.completions.create(model="gpt-4o", messages=OK)


def _raw_post(served, body: bytes, headers=None):
    host, port = served.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data)


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000,
                                  b'{"model": "tiny-neva", "messages": "hi"}', b'"just a string"'])
def test_malformed_json_or_schema_is_400(served, body):
    status, reply = _raw_post(served, body)
    assert status == 400 and reply["error"]["type"] == "invalid_request_error"


def test_body_over_the_limit_is_400(served):
    with pytest.raises(openai.BadRequestError) as err:
        served.client().chat.completions.create(model=served.model_id, messages=OK,
                                                extra_body={"pad": "x" * LIMITS["max_body_bytes"]})
    assert err.value.body["code"] == "body_too_large"


def test_huge_content_length_is_refused_before_the_body_is_sent(served):
    host, port = served.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", str(10 ** 12))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 400 and json.loads(resp.read())["error"]["code"] == "body_too_large"
    conn.close()


def test_server_still_answers_after_the_refusals(served):
    reply = served.client().chat.completions.create(model=served.model_id, messages=OK, max_tokens=2, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")
