"""A `<video>` tag in a Triton prompt without a server: it takes the model's `num_frames` input_media slots as
one video's frames, so a model with `model.mm_cfg.video.pool` pools them (frames as separate images would not
be pooled and would get another answer). Oracle: `generate` given the same `Video`."""
import numpy as np
import pytest
import torch
from PIL import Image

from nemo_neva import build_model
from nemo_neva.data.video_io import Video
from nemo_neva.inference.generate import encode_prompt, generate
from nemo_neva.inference.prompting import build_prompt
from nemo_neva.serving.limits import ServerLimits
from nemo_neva.serving.triton_model import InvalidInput, NevaTritonModel, TorchBackend
from nemo_neva.serving.worker import serving_stops
from tests.model.helpers import tiny_model_cfg
from tests.serving.test_triton_model import FakeBackend, pixels
from tests.serving.test_triton_multi_image import answer, padded, request

TEMPLATE = "nv_steerlm"
FRAMES = 3
LIMITS = ServerLimits(max_tokens=8, max_image_pixels=4096, max_text_chars=300, max_images=1, max_videos=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = tiny_model_cfg(encoder_seq_length=192, **{"mm_cfg.video.pool": "2x2", "data.video.num_frames": FRAMES})
    return build_model(cfg).eval()


def _oracle(model, question, media):
    ids, strings = serving_stops(model, TEMPLATE)
    prompt = build_prompt(TEMPLATE, question, "<image>" in question, has_video=True)
    return generate(model, [media], [prompt], max_new_tokens=LIMITS.max_tokens, stop_token_ids=ids,
                    stop_strings=strings)[0], prompt


def test_a_video_tag_takes_num_frames_slots_and_is_pooled_like_generate(model):
    m = NevaTritonModel(TorchBackend(model, TEMPLATE), TEMPLATE, LIMITS)
    frames = [pixels(10 + k) for k in range(FRAMES)]
    image = pixels(50)
    video = Video([Image.fromarray(f) for f in frames], list(range(FRAMES)), FRAMES)
    question = "First <image>, then <video>: which way?"
    expected, prompt = _oracle(model, question, [Image.fromarray(image), video])
    [got] = answer(m, request(question, padded(image, *frames)))
    assert got == expected and got
    # the prompt the server sized holds 16 image + 3 x 4 pooled frame placeholders, not 4 x 16
    ids = encode_prompt(model, prompt, [Image.fromarray(image), video])
    assert int((ids == model.image_token_id).sum()) == model.tokens_per_image + FRAMES * model.tokens_per_frame == 28
    [leading] = answer(m, request("<video>\nWhich way?", padded(*frames)))
    assert leading == _oracle(model, "<video>\nWhich way?", [video])[0]


def test_video_refusals_name_the_input(model):
    m = NevaTritonModel(TorchBackend(model, TEMPLATE), TEMPLATE, LIMITS)
    frames = padded(*[pixels(10 + k) for k in range(FRAMES)])
    cases = [
        (request("<video> and <video>?", np.concatenate([frames, frames])), "input_media",
         r"6 input_media slots in one prompt; this server takes at most 4 \(limits.max_images images \+ "
         r"limits.max_videos videos of 3 frames\)"),
        (request("<video> and <video>?", frames), "input_text",
         "2 <video> tags in one prompt; this server takes at most 1"),
        (request("<video>?", frames[:2]), "input_media",
         r"input_text has 0 <image> and 1 <video> tag\(s\), which take 3 input_media slots .* got 2"),
        (request("<image> <image> <video>?", padded(*[pixels(k) for k in range(4)])), "input_media",
         "2 images in one prompt; this server takes at most 1"),
    ]
    for data, param, message in cases:
        with pytest.raises(InvalidInput, match=f"input '{param}': {message}"):
            m([data])
    fake = NevaTritonModel(FakeBackend(), TEMPLATE, LIMITS)  # a backend without num_frames (TensorRT-LLM's)
    with pytest.raises(InvalidInput, match="backend takes no <video> tag: send a video's frames as images"):
        fake([request("<video>?", frames[:1])])
