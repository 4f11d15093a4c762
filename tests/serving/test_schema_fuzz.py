"""schemathesis against the published OpenAPI document, on loopback: no 5xx, no hang, replies as documented.

Bounded: a fixed number of generated requests (derandomized, no example database), each with a timeout.
The default suite runs a small positive + negative sample; `-m slow` runs a larger one.
"""
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.serving.serving_helpers import running_server

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
REQUEST_TIMEOUT_S = 30  # a hang fails the example instead of the suite


@pytest.fixture(scope="module")
def api(served):
    with running_server(served.model, model_id="m", max_tokens=4, max_body_bytes=200_000, max_image_bytes=50_000,
                        max_image_pixels=250_000, max_video_bytes=50_000, max_text_chars=2000, max_messages=6) as url:
        yield url, schemathesis.openapi.from_url(url + "/openapi.json")


def _fuzz(api, data, mode):
    url, schema = api
    case = data.draw(schema.as_strategy(generation_mode=mode))
    checks = CHECKS + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])
    start = time.monotonic()
    case.call_and_validate(base_url=url, checks=checks, timeout=REQUEST_TIMEOUT_S)
    assert time.monotonic() - start < REQUEST_TIMEOUT_S


_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@settings(max_examples=25, **_SETTINGS)
@given(data=st.data())
def test_fuzz_small(api, data, mode):
    _fuzz(api, data, mode)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@settings(max_examples=300, **_SETTINGS)
@given(data=st.data())
def test_fuzz_large(api, data, mode):
    _fuzz(api, data, mode)


def test_limits_still_hold_for_schema_valid_requests(api):
    """The schema allows any string as an image or video URL or text; the limits still refuse what is too big."""
    url, schema = api
    operation = schema["/v1/chat/completions"]["POST"]
    for content, code in [("a" * 2001, "prompt_too_long"),
                          ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 80_000}}],
                           "image_too_large"),
                          ([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + "A" * 80_000}}],
                           "video_too_large")]:
        case = operation.Case(body={"model": "m", "messages": [{"role": "user", "content": content}]},
                              media_type="application/json")
        response = case.call_and_validate(base_url=url, checks=CHECKS, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 400 and response.json()["error"]["code"] == code
