"""A video in a prompt is its sampled frames as images: generate(video, "<video>...") must answer exactly as
generate(the frames drawn at transformers' uniform indices, one `<image>` tag per frame). The video is
written here with PyAV, losslessly, so only decoding + sampling + tag expansion stand between the two."""
import numpy as np
import pytest
import torch
from PIL import Image

from nemo_neva import build_model
from nemo_neva.data.constants import IMAGE_TOKEN
from nemo_neva.data.video_io import VideoSettings, open_video, video_settings_of
from nemo_neva.data.video_writer import write_video
from nemo_neva.inference.generate import encode_prompt, generate, generate_tokens
from tests.model.helpers import llama_overrides, tiny_model_cfg
from tests.optional import require

require("av")
NUM_FRAMES = 3
QUESTION = "Which way does it move?"


def moving_square(n, size=32, colour=(220, 30, 30)):
    """n frames of a square travelling left -> right over a light background."""
    frames = []
    for i in range(n):
        a = np.full((size, size, 3), 245, np.uint8)
        x = round(i * (size - 8) / max(n - 1, 1))
        a[12:20, x:x + 8] = colour
        frames.append(Image.fromarray(a))
    return frames


@pytest.fixture(scope="module")
def model():
    """The tiny LLaMA-style model with room for a 3-frame video (3 x 16 placeholders) and an answer."""
    torch.manual_seed(2)
    return build_model(tiny_model_cfg(**llama_overrides(), encoder_seq_length=128,
                                            **{"data.video.num_frames": NUM_FRAMES}))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    drawn = moving_square(10)
    path = tmp_path_factory.mktemp("video") / "square.mp4"
    write_video(path, drawn)
    return str(path), drawn


def test_a_video_answers_as_its_frames_do(model, clip):
    from transformers.video_utils import load_video

    path, drawn = clip
    settings = video_settings_of(model.cfg)
    assert settings == VideoSettings(NUM_FRAMES, "uniform")  # read from the model's data config
    video = open_video(path, settings)
    _, meta = load_video(path, num_frames=NUM_FRAMES, backend="pyav")
    assert video.indices == [int(i) for i in meta.frames_indices]
    frames = [drawn[i] for i in video.indices]
    for got, want in zip(video.frames, frames):  # lossless file: decoding gives back the drawn pixels
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    prompt = f"<video>\n{QUESTION}"
    as_images = f"{IMAGE_TOKEN * NUM_FRAMES}\n{QUESTION}"
    ids = encode_prompt(model, prompt, [video])
    assert int((ids == model.image_token_id).sum()) == NUM_FRAMES * model.tokens_per_image
    assert torch.equal(ids, encode_prompt(model, as_images, frames))
    kw = dict(max_new_tokens=8, stop_token_ids=[])
    assert generate_tokens(model, [video], [prompt], **kw) == generate_tokens(model, [frames], [as_images], **kw)
    assert generate(model, [video], [prompt], **kw) == generate(model, [frames], [as_images], **kw)
    # in a batch with an image request and a text-only one, and without the cache: the same answers
    requests = ([video, drawn[0], None], [prompt, "<image>\nWhat colour?", "Hello"])
    alone = [generate_tokens(model, [m], [p], **kw)[0] for m, p in zip(*requests)]
    assert generate_tokens(model, *requests, **kw) == alone
    assert generate_tokens(model, *requests, use_cache=False, **kw) == alone


def test_video_and_tag_must_agree(model, clip):
    video = open_video(clip[0], VideoSettings(NUM_FRAMES))
    with pytest.raises(ValueError, match="tag 1 is <image> but its item is a video"):
        generate(model, [video], [f"<image>\n{QUESTION}"])
    with pytest.raises(ValueError, match="1 <image>/<video> tag.* for 0 image"):
        generate(model, [None], [f"<video>\n{QUESTION}"])
    with pytest.raises(ValueError, match="0 <image>/<video> tag.* for 1 image"):
        generate(model, [video], [QUESTION])
    with pytest.raises(ValueError, match="exceeds the context"):  # 8 frames x 16 placeholders > 128
        generate(model, [open_video(clip[0], VideoSettings(8))], [f"<video>\n{QUESTION}"])
