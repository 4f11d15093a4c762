"""The chat page at / in a real headless chromium, against examples/neva_serve.py (the `served` fixture):
what the page streams is what the API answers, errors read as the server wrote them, history carries over."""
import base64
import json

import openai
import pytest
from PIL import Image

from tests.serving.browser_helpers import DEMO_IMAGE, ChatPage, browser_or_skip, launch
from tests.serving.serving_helpers import LIMITS, running_server


@pytest.fixture(scope="module")
def browser():
    browser_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


@pytest.fixture
def chat(browser, served):
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = ChatPage(context.new_page(), served.url)
    yield page
    context.close()


def _demo_url():
    with open(DEMO_IMAGE, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def _user(text, url=None):
    parts = [{"type": "text", "text": text}]
    if url:  # the page sends the image part first (the "<image>\n{question}" layout)
        parts.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {"role": "user", "content": parts}


def _greedy(served, messages):
    reply = served.client().chat.completions.create(model=served.model_id, messages=messages, temperature=0)
    return reply.choices[0].message.content


def test_streamed_greedy_answer_equals_the_api_and_the_second_turn_keeps_history(chat, served):
    chat.page.get_by_label("Temperature", exact=True).fill("0")
    chat.attach(DEMO_IMAGE)
    chat.ask("What colour is the shape?")
    first = chat.wait_answer(1)
    sent = chat.sent[0]
    assert sent["stream"] is True and sent["temperature"] == 0 and sent["model"] == served.model_id
    assert sent["messages"] == [_user("What colour is the shape?", _demo_url())]  # the file's bytes, as sent
    assert first and first == _greedy(served, sent["messages"])
    usage = chat.answers().nth(0).locator(".usage").text_content()
    assert "prompt +" in usage and "completion tokens" in usage and " s" in usage

    chat.ask("Is it big?")
    second = chat.wait_answer(2)
    history = chat.sent[1]["messages"]
    assert history == [_user("What colour is the shape?", _demo_url()), {"role": "assistant", "content": first},
                       _user("Is it big?")]
    assert second == _greedy(served, history)
    assert chat.log.locator(".msg").count() == 4
    assert LIMITS["max_images"] > 1 and chat.page.get_by_label("Image", exact=True).is_enabled()  # 1 of 3 used

    chat.page.get_by_role("button", name="New chat").click()
    assert chat.log.locator(".msg").count() == 0 and chat.page.get_by_label("Image", exact=True).is_enabled()
    chat.ask("Hello?")
    chat.wait_answer(1)
    assert chat.sent[2]["messages"] == [_user("Hello?")]
    assert chat.console_errors == []


def test_an_oversized_image_shows_the_servers_error_text(chat, served, tmp_path):
    noise = Image.effect_noise((200, 200), 120).convert("RGB")  # incompressible: > max_image_bytes
    path = tmp_path / "big.png"
    noise.save(path)
    assert path.stat().st_size > LIMITS["max_image_bytes"]
    with pytest.raises(openai.BadRequestError) as err:
        served.client().chat.completions.create(model=served.model_id, messages=[_user(
            "What is it?", "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode())])
    expected = err.value.body["message"]
    assert "larger than the limit" in expected

    chat.attach(str(path))
    chat.ask("What is it?")
    shown = chat.wait_error()
    assert expected in shown
    assert chat.answers().count() == 0  # no half answer left behind
    assert chat.page.get_by_label("Message", exact=True).input_value() == "What is it?"  # back to edit
    # The one console line is chromium's own note of the refused request's HTTP 400.
    assert [e for e in chat.console_errors if "status of 400" not in e] == []


def test_controls_show_the_servers_defaults_and_steerlm_sliders(chat, served):
    config = json.loads(chat.page.evaluate("fetch('/config').then(r => r.text())"))
    page = chat.page
    assert float(page.get_by_label("Temperature", exact=True).input_value()) == config["defaults"]["temperature"]
    assert float(page.get_by_label("Top-p", exact=True).input_value()) == config["defaults"]["top_p"]
    assert page.get_by_label("Max tokens", exact=True).input_value() == ""  # null: the server decides
    assert page.get_by_label("Seed", exact=True).input_value() == ""
    steer = page.get_by_role("group", name="SteerLM attributes")
    assert steer.is_visible()  # the served template is nv_steerlm
    sliders = steer.get_by_role("slider")
    assert sliders.count() == len(config["steerlm"])
    assert {s.get_attribute("id").removeprefix("steer-"): int(s.input_value())
            for s in sliders.all()} == config["steerlm"]
    page.get_by_label("quality", exact=True).fill("3")
    page.get_by_label("Max tokens", exact=True).fill("2")
    chat.ask("Hi")
    chat.wait_answer(1)
    assert chat.sent[0]["steerlm"] == {**config["steerlm"], "quality": 3} and chat.sent[0]["max_tokens"] == 2
    assert chat.console_errors == []


def test_no_steerlm_sliders_for_other_templates(browser, served):
    with running_server(served.model, template="vicuna_v1") as url:
        context = browser.new_context()
        chat = ChatPage(context.new_page(), url)
        assert not chat.page.get_by_role("group", name="SteerLM attributes").is_visible()
        chat.ask("Hi")
        chat.wait_answer(1)
        assert "steerlm" not in chat.sent[0]
        assert chat.console_errors == []
        context.close()
