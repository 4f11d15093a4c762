"""The chat page at / in a real headless chromium, against examples/neva_serve.py (the `served` fixture):
what the page streams is what the API answers, errors read as the server wrote them, history carries over.
Videos against an in-process server whose model samples 3 frames: what reaches the model is checked through
the server's answer and prompt token count; limits the page knows from /config stop a request before it goes."""
import base64
import json

import openai
import pytest
import torch
from PIL import Image

from nemo_neva import build_model
from nemo_neva.data.conversation import STEERLM_INFERENCE_DEFAULTS, render_prompt
from nemo_neva.data.image_io import open_user_image
from nemo_neva.data.video_io import open_video, video_settings_of
from nemo_neva.data.video_writer import write_video
from nemo_neva.inference.generate import encode_prompt
from nemo_neva.serving.worker import serving_stops
from tests.model.helpers import tiny_model_cfg
from tests.optional import require
from tests.serving.browser_helpers import DEMO_IMAGE, ChatPage, browser_or_skip, launch
from tests.serving.serving_helpers import (LIMITS, TEMPLATE, moving_square, noise_frames, running_server,
                                          video_bytes)


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
    assert chat.log.locator(".msg.user").first.get_by_role("img", name="Image sent").count() == 1

    chat.page.get_by_role("button", name="New chat").click()
    assert chat.log.locator(".msg").count() == 0 and chat.page.get_by_label("Image", exact=True).is_enabled()
    chat.ask("Hello?")
    chat.wait_answer(1)
    assert chat.sent[2]["messages"] == [_user("Hello?")]
    assert chat.console_errors == []


def test_an_image_the_server_refuses_shows_the_servers_error_text(chat, served, tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (1001, 1000), (200, 30, 30)).save(path)  # a small file of too many pixels
    assert path.stat().st_size < LIMITS["max_image_bytes"] and 1001 * 1000 > LIMITS["max_image_pixels"]
    with pytest.raises(openai.BadRequestError) as err:
        served.client().chat.completions.create(model=served.model_id, messages=[_user(
            "What is it?", "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode())])
    expected = err.value.body["message"]
    assert "pixels" in expected

    chat.attach(str(path))
    chat.ask("What is it?")
    shown = chat.wait_error()
    assert expected in shown
    assert chat.answers().count() == 0  # no half answer left behind
    assert chat.page.get_by_label("Message", exact=True).input_value() == "What is it?"  # back to edit
    assert chat.attachments().filter(has_text="wide.png").count() == 1
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


# ------------------------------------------------------------------------------------------------ videos
NUM_FRAMES = 3  # the video model's model.data.video.num_frames: 3 x 16 placeholders keep the prompt short
# An in-process server for videos: 1 per conversation, files up to 20 kB of up to 12 frames, and a body limit
# that two attachments each under its own limit can pass together (asserted where it matters).
VIDEO_LIMITS = {**LIMITS, "max_videos": 1, "max_video_bytes": 20_000, "max_video_frames": 12,
                "max_body_bytes": 40_000}


@pytest.fixture(scope="module")
def video_server():
    require("av")
    torch.manual_seed(3)
    model = build_model(tiny_model_cfg(encoder_seq_length=192, **{"data.video.num_frames": NUM_FRAMES}))
    with running_server(model.eval(), **VIDEO_LIMITS) as url:
        yield model, url


@pytest.fixture
def video_chat(browser, video_server):
    model, url = video_server
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    yield ChatPage(context.new_page(), url), model
    context.close()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_an_image_and_a_video_go_in_order_and_the_server_answers_from_both(video_chat, tmp_path):
    chat, model = video_chat
    clip = video_bytes(tmp_path, moving_square(10))
    chat.page.get_by_label("Temperature", exact=True).fill("0")
    chat.attach(DEMO_IMAGE)
    chat.attach(str(tmp_path / "clip.mp4"), "Video")
    chat.ask("Which way does it move?")
    answer = chat.wait_answer(1)
    sent = chat.sent[0]
    assert sent["messages"] == [{"role": "user", "content": [  # in the order attached, the file's own bytes
        {"type": "image_url", "image_url": {"url": _demo_url()}},
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + _b64(clip)}},
        {"type": "text", "text": "Which way does it move?"}]}]
    # Server side: the answer is generate's with the clip's sampled frames, and the prompt tokens the server
    # reports count them (NUM_FRAMES x tokens per image), which only a video_url part it decoded can add.
    media = [open_user_image(DEMO_IMAGE), open_video(clip, video_settings_of(model.cfg))]
    prompt = render_prompt(TEMPLATE, [{"from": "human", "value": "<image>\n<video>\nWhich way does it move?"}],
                           attributes=sent["steerlm"], steerlm_defaults=STEERLM_INFERENCE_DEFAULTS)
    ids, strings = serving_stops(model, TEMPLATE)
    expected = model.generate([media], [prompt], max_new_tokens=VIDEO_LIMITS["max_tokens"], stop_token_ids=ids,
                              stop_strings=strings)[0]
    assert answer == expected
    n_prompt = len(encode_prompt(model, prompt, media))
    assert n_prompt > (1 + NUM_FRAMES) * model.tokens_per_image
    assert chat.answers().nth(0).locator(".usage").text_content().startswith(f"{n_prompt} prompt + ")
    bubble = chat.log.locator(".msg.user")
    assert bubble.get_by_role("img", name="Image sent").count() == 1
    assert bubble.get_by_label("Video sent: clip.mp4").count() == 1  # a <video> (chromium plays this mp4)
    assert chat.page.get_by_label("Video", exact=True).is_disabled()  # the conversation's 1 video is used
    assert chat.page.get_by_label("Image", exact=True).is_enabled()
    assert chat.console_errors == []


def test_attachments_over_the_limits_are_refused_on_the_page_and_nothing_is_sent(video_chat, tmp_path):
    chat, _ = video_chat
    big = video_bytes(tmp_path, noise_frames(8), "noise.mp4")
    assert len(big) > VIDEO_LIMITS["max_video_bytes"]
    chat.page.get_by_label("Video", exact=True).set_input_files(str(tmp_path / "noise.mp4"))
    assert chat.attach_alert() == (f"noise.mp4 is {len(big) / 1024:.1f} KB; this server takes videos of up to "
                                   "19.5 KB (server.max_video_bytes).")
    assert chat.attachments().count() == 0
    noise = tmp_path / "noise.png"
    Image.effect_noise((200, 200), 120).convert("RGB").save(noise)  # incompressible: > max_image_bytes
    assert noise.stat().st_size > VIDEO_LIMITS["max_image_bytes"]
    chat.page.get_by_label("Image", exact=True).set_input_files(str(noise))
    assert "this server takes images of up to 58.6 KB (server.max_image_bytes)." in chat.attach_alert()

    chat.attach(DEMO_IMAGE)  # accepted: the alert goes
    assert chat.page.locator("#attach-alert").is_hidden()
    write_video(tmp_path / "small.avi", moving_square(4), container="avi")  # one chromium cannot play
    chat.attach(str(tmp_path / "small.avi"), "Video")
    chip = chat.attachments().locator(".file-chip")  # in place of a <video>
    chip.wait_for()
    assert chip.get_attribute("aria-label") == "Video to send: small.avi"
    assert chat.page.get_by_label("Video", exact=True).is_disabled()
    # a second video dropped on the page
    chat.page.evaluate("""() => { const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(64)], "second.mp4", {type: "video/mp4"}));
        document.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true})); }""")
    assert chat.attach_alert() == ("This server takes 1 video per conversation (server.max_videos); start a "
                                   "New chat for more.")
    assert chat.attachments().count() == 2

    # Each file under its own limit, together over the body limit: refused before sending.
    chat.page.get_by_role("button", name="Remove small.avi").click()
    near = video_bytes(tmp_path, noise_frames(2), "near.mp4")
    mid = tmp_path / "mid.png"
    Image.effect_noise((100, 100), 120).convert("RGB").save(mid)
    assert len(near) < VIDEO_LIMITS["max_video_bytes"] and mid.stat().st_size < VIDEO_LIMITS["max_image_bytes"]
    assert 4 / 3 * (len(near) + mid.stat().st_size) > VIDEO_LIMITS["max_body_bytes"]  # base64 is 4/3 the bytes
    chat.attach(str(tmp_path / "near.mp4"), "Video")
    chat.attach(str(mid))
    chat.ask("What is it?")
    assert "this server takes up to 39.1 KB (server.max_body_bytes)" in chat.attach_alert()
    assert chat.attachments().count() == 3 and chat.log.locator(".msg").count() == 0
    assert chat.page.get_by_label("Message", exact=True).input_value() == "What is it?"
    assert chat.sent == [] and chat.console_errors == []


def test_a_video_the_server_refuses_shows_its_error_and_stays_attached(video_chat, tmp_path):
    chat, _ = video_chat
    long = video_bytes(tmp_path, moving_square(VIDEO_LIMITS["max_video_frames"] + 8), "long.mp4")
    assert len(long) < VIDEO_LIMITS["max_video_bytes"]  # refused by the server for its frames, not on the page
    chat.attach(str(tmp_path / "long.mp4"), "Video")
    chat.ask("Which way?")
    assert f"video refused: more than {VIDEO_LIMITS['max_video_frames']} frames (messages[0].content[0])" in \
        chat.wait_error()
    assert chat.answers().count() == 0
    assert chat.page.get_by_label("Message", exact=True).input_value() == "Which way?"
    assert chat.attachments().filter(has_text="long.mp4").count() == 1  # back to edit and resend
    assert [e for e in chat.console_errors if "status of 400" not in e] == []
