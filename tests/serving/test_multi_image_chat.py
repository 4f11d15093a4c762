"""Several images in one conversation through the OpenAI-compatible server (the official `openai` client against
examples/neva_serve.py): each image_url part puts its <image> tag where the part stands, and the answer is
`generate` called directly with the same images, in order, and the equivalent prompt (greedy, exact string)."""
import openai
import pytest

from nemo_neva.data.conversation import STEERLM_INFERENCE_DEFAULTS, render_prompt
from nemo_neva.inference.generate import encode_prompt
from nemo_neva.serving.worker import serving_stops
from tests.serving.serving_helpers import LIMITS, TEMPLATE, coloured, png_data_url


def _image(k):
    return {"type": "image_url", "image_url": {"url": png_data_url(coloured(k))}}


def _text(t):
    return {"type": "text", "text": t}


def _oracle(served, turns, images, max_tokens):
    prompt = render_prompt(TEMPLATE, turns, steerlm_defaults=STEERLM_INFERENCE_DEFAULTS)
    ids, strings = serving_stops(served.model, TEMPLATE)
    text = served.model.generate([images], [prompt], max_new_tokens=max_tokens, stop_token_ids=ids,
                                 stop_strings=strings)[0]
    return text, prompt


def _ask(served, messages, **kw):
    return served.client().chat.completions.create(model=served.model_id, messages=messages, temperature=0, **kw)


def test_two_images_in_one_message_interleaved_with_text_streamed_or_not(served):
    messages = [{"role": "user", "content": [_text("First:"), _image(1), _text("Second:"), _image(2),
                                             _text("Which has more shapes?")]}]
    expected, prompt = _oracle(served, [{"from": "human", "value": "First:\n<image>\nSecond:\n<image>\n"
                                                                   "Which has more shapes?"}],
                               [coloured(1), coloured(2)], max_tokens=10)
    reply = _ask(served, messages, max_tokens=10)
    assert expected and reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(encode_prompt(served.model, prompt, 2))
    chunks = _ask(served, messages, max_tokens=10, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_images_across_two_user_turns(served):
    messages = [{"role": "user", "content": [_image(3), _text("What is it?")]},
                {"role": "assistant", "content": "A square."},
                {"role": "user", "content": [_text("And this one?"), _image(4)]}]
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."},
             {"from": "human", "value": "And this one?\n<image>"}]
    expected, prompt = _oracle(served, turns, [coloured(3), coloured(4)], max_tokens=8)
    reply = _ask(served, messages, max_tokens=8)
    assert expected and reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(encode_prompt(served.model, prompt, 2))


def test_more_images_than_the_limit_is_one_line_400_with_the_count(served):
    n = LIMITS["max_images"] + 1
    messages = [{"role": "user", "content": [_image(5), _text("Look.")]}, {"role": "assistant", "content": "Ok."},
                {"role": "user", "content": [*(_image(6 + k) for k in range(n - 1)), _text("And these?")]}]
    with pytest.raises(openai.BadRequestError) as err:
        _ask(served, messages, max_tokens=2)
    body = err.value.body
    assert body["code"] == "too_many_images" and body["param"] == "messages"
    assert body["message"] == (f"{n} images in this conversation; this server takes at most {LIMITS['max_images']} "
                               "per conversation (server.max_images)")
    # at the limit it is answered
    ok = [messages[0], messages[1], {"role": "user", "content": [*(_image(6 + k) for k in range(n - 2)), _text("?")]}]
    assert _ask(served, ok, max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_max_images_is_a_whole_count_and_zero_means_text_only():
    from nemo_neva.serving.chat_request import parse_chat_request
    from nemo_neva.serving.errors import RequestError
    from nemo_neva.serving.limits import ServerLimits

    assert ServerLimits.from_cfg({"max_images": 16}).max_images == 16
    with pytest.raises(ValueError, match=r"^limits\.max_images must be a whole number, got 2\.5$"):
        ServerLimits.from_cfg({"max_images": 2.5}, section="limits")
    body = {"model": "m", "messages": [{"role": "user", "content": [_image(1), _text("hi")]}]}
    with pytest.raises(RequestError, match=r"^1 image in this conversation; this server takes text only") as err:
        parse_chat_request(body, ServerLimits(max_images=0), TEMPLATE, "m")
    assert err.value.code == "too_many_images"
    assert len(parse_chat_request(body, ServerLimits(max_images=1), TEMPLATE, "m").images) == 1
