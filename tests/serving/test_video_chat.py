"""A video in a conversation through the OpenAI-compatible server (the official `openai` client against a real
uvicorn server): a `video_url` data URL puts a `<video>` tag where the part stands, the server samples the
model's own `model.data.video` frames, and the answer is `generate` called directly with the `Video` that
`open_video` makes of the same file (greedy, exact string). Bad videos are one-line 400s with a reason code."""
import base64

import openai
import pytest
import torch

from nemo_neva import build_model
from nemo_neva.data.conversation import STEERLM_INFERENCE_DEFAULTS, render_prompt
from nemo_neva.data.video_io import open_video, sample_indices, video_settings_of
from nemo_neva.inference.generate import encode_prompt
from nemo_neva.serving.limits import ServerLimits
from nemo_neva.serving.worker import serving_stops
from tests.model.helpers import tiny_model_cfg
from tests.optional import require
from tests.serving.serving_helpers import (TEMPLATE, coloured, moving_square, noise_frames, png_data_url,
                                          running_server, video_bytes)

require("av")
NUM_FRAMES = 3  # the model's model.data.video.num_frames: 3 x 16 placeholders keep the prompt short
MAX_FRAMES = 12  # server.max_video_frames: the 10-frame clip passes, a 20-frame one does not
MAX_VIDEO_BYTES = 20_000  # server.max_video_bytes: above the smooth clip's size, below the noise clip's (asserted)
# server.max_video_pixels: the 32x32 clip decodes frames 0..6 (uniform 3 of 10: 0, 3, 6) = 7168 pixels, which
# fit; the same clip at 48x48 (16128) does not
MAX_VIDEO_PIXELS = 32 * 32 * 8
LIMITS = dict(max_tokens=10, max_body_bytes=300_000, max_image_bytes=60_000, max_videos=1,
              max_video_frames=MAX_FRAMES, max_video_bytes=MAX_VIDEO_BYTES, max_video_pixels=MAX_VIDEO_PIXELS)


def video_part(data: bytes, mime="video/mp4"):
    return {"type": "video_url", "video_url": {"url": f"data:{mime};base64," + base64.b64encode(data).decode()}}


def text(t):
    return {"type": "text", "text": t}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    m = build_model(tiny_model_cfg(encoder_seq_length=192, **{"data.video.num_frames": NUM_FRAMES}))
    return m.eval()


@pytest.fixture(scope="module")
def server(model):
    with running_server(model, **LIMITS) as url:
        yield url


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return video_bytes(tmp_path_factory.mktemp("video"), moving_square(10))


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def ask(url, messages, **kw):
    return client(url).chat.completions.create(model="m", messages=messages, temperature=0, **kw)


def refusal(url, messages) -> dict:
    with pytest.raises(openai.BadRequestError) as err:
        ask(url, messages, max_tokens=2)
    body = err.value.body
    assert "\n" not in body["message"] and "Traceback" not in body["message"]
    return body


def oracle(model, value, media, max_tokens):
    prompt = render_prompt(TEMPLATE, [{"from": "human", "value": value}], steerlm_defaults=STEERLM_INFERENCE_DEFAULTS)
    ids, strings = serving_stops(model, TEMPLATE)
    answer = model.generate([media], [prompt], max_new_tokens=max_tokens, stop_token_ids=ids,
                            stop_strings=strings)[0]
    return answer, prompt


def test_a_video_answers_as_generate_with_its_video_streamed_or_not(model, server, clip):
    video = open_video(clip, video_settings_of(model.cfg))
    assert len(video.frames) == NUM_FRAMES  # sampled as the model's data config says
    expected, prompt = oracle(model, "<video>\nWhich way does it move?", [video], max_tokens=10)
    messages = [{"role": "user", "content": [video_part(clip), text("Which way does it move?")]}]
    reply = ask(server, messages, max_tokens=10)
    assert expected and reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(encode_prompt(model, prompt, [video]))
    chunks = ask(server, messages, max_tokens=10, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_an_image_and_a_video_in_one_message(model, server, clip):
    video = open_video(clip, video_settings_of(model.cfg))
    expected, prompt = oracle(model, "Photo:\n<image>\nClip:\n<video>\nSame colour?", [coloured(7), video],
                              max_tokens=8)
    messages = [{"role": "user", "content": [text("Photo:"), {"type": "image_url", "image_url": {
        "url": png_data_url(coloured(7))}}, text("Clip:"), video_part(clip), text("Same colour?")]}]
    reply = ask(server, messages, max_tokens=8)
    assert expected and reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(encode_prompt(model, prompt, [coloured(7), video]))


@pytest.mark.parametrize("data, mime", [(b"not a video at all, just bytes", "video/mp4"),
                                        (b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8, "video/mp4"),
                                        (None, "video/mp4")])  # None: the first half of a real mp4
def test_garbage_is_a_one_line_bad_video(server, clip, data, mime):
    data = clip[:len(clip) // 2] if data is None else data
    body = refusal(server, [{"role": "user", "content": [video_part(data, mime), text("?")]}])
    assert body["code"] == "bad_video" and body["param"] == "messages[0].content[0]"
    assert body["message"].startswith("video refused: ")


def test_too_many_frames_too_large_and_too_many_pixels_are_refused(server, tmp_path):
    long_clip = video_bytes(tmp_path, moving_square(MAX_FRAMES + 8), "long.mp4")
    assert len(long_clip) < MAX_VIDEO_BYTES  # refused for its frames, not its size
    body = refusal(server, [{"role": "user", "content": [text("Look:"), video_part(long_clip)]}])
    assert body["code"] == "video_too_many_frames" and body["param"] == "messages[0].content[1]"
    assert body["message"] == f"video refused: more than {MAX_FRAMES} frames"
    big = video_bytes(tmp_path, noise_frames(8), "noise.mp4")
    assert len(big) > MAX_VIDEO_BYTES  # incompressible frames, losslessly coded
    body = refusal(server, [{"role": "user", "content": [video_part(big)]}])
    assert body["code"] == "video_too_large"  # from the base64 length, before decoding
    assert body["message"] == f"video is larger than the limit of {MAX_VIDEO_BYTES} bytes"
    wide = video_bytes(tmp_path, moving_square(10, size=48), "wide.mp4")
    assert len(wide) < MAX_VIDEO_BYTES
    body = refusal(server, [{"role": "user", "content": [video_part(wide)]}])
    assert body["code"] == "video_too_many_pixels"  # from the stream header, before decoding
    to_decode = max(sample_indices(10, NUM_FRAMES)) + 1  # decoding stops at the last sampled frame
    assert to_decode * 48 * 48 > MAX_VIDEO_PIXELS >= to_decode * 32 * 32
    assert body["message"] == (f"video refused: {to_decode} frames of 48x48 to decode exceed {MAX_VIDEO_PIXELS} "
                               "pixels")


def test_video_count_limit_and_zero_means_no_video(model, server, clip):
    two = [{"role": "user", "content": [video_part(clip)]}, {"role": "assistant", "content": "Ok."},
           {"role": "user", "content": [video_part(clip), text("And now?")]}]
    body = refusal(server, two)
    assert body["code"] == "too_many_videos" and body["param"] == "messages"
    assert body["message"] == ("2 videos in this conversation; this server takes at most 1 per conversation "
                               "(server.max_videos)")
    with running_server(model, **{**LIMITS, "max_videos": 0}) as url:
        body = refusal(url, [{"role": "user", "content": [video_part(clip), text("?")]}])
        assert body["code"] == "too_many_videos"
        assert body["message"] == "1 video in this conversation; this server takes no video (server.max_videos=0)"
        # images still pass there
        reply = ask(url, [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": png_data_url(coloured(1))}}]}], max_tokens=2)
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_what_else_a_client_can_get_wrong_about_videos(server, clip):
    cases = [
        ([{"role": "user", "content": [text("Here is a <video> for you")]}], "messages[0]",
         "message text must not contain the video tag <video>; send videos as video_url parts"),
        ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}]}],
         "messages[0].content[0]", "remote video URLs are not fetched; send the video inline as a data: URL "
                                   "(data:video/mp4;base64,...)"),
        ([{"role": "user", "content": [{"type": "video_url", "video_url": "data:video/mp4;base64,AAAA"}]}],
         "messages[0].content[0]", "a video_url part needs a 'video_url': {'url': ...} object"),
        ([{"role": "user", "content": [{"type": "video_url", "video_url": {
            "url": "data:image/png;base64," + base64.b64encode(clip).decode()}}]}],
         "messages[0].content[0]", "data: URL media type 'image/png' is not a video"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [video_part(clip)]},
          {"role": "user", "content": "?"}], "messages[1].content[0]", "only user messages may hold videos"),
    ]
    for messages, param, message in cases:
        body = refusal(server, messages)
        assert (body["param"], body["message"]) == (param, message)


def test_video_limits_are_checked_at_startup():
    assert ServerLimits.from_cfg({"max_videos": 0}).max_videos == 0
    with pytest.raises(ValueError, match=r"^server\.max_videos must be a whole number, got 1\.5$"):
        ServerLimits.from_cfg({"max_videos": 1.5})
    for key in ("max_video_bytes", "max_video_frames", "max_video_pixels"):
        with pytest.raises(ValueError, match=rf"^server\.{key} must be > 0$"):
            ServerLimits.from_cfg({key: 0})
