"""Prompts of different lengths (with and without an image) decoded together give the same greedy answers
as one at a time: left padding, its masks and positions, and rows leaving the batch early change nothing."""
import pytest
import torch

from nemo_neva import build_model
from nemo_neva.inference.generate import generate, generate_tokens
from tests.model.helpers import llama_overrides, tiny_model_cfg

STYLES = {"gpt": {}, "llama_gqa": llama_overrides()}
PROMPTS = ["<image>\nWhat colour is the shape?", "Hello", "<image>\nIs there a circle, a square or a triangle in "
           "the picture, and where is it?", "A much longer text-only prompt about red, green and blue shapes.",
           "<image>\nHi"]


@pytest.fixture(scope="module", params=list(STYLES), ids=list(STYLES))
def model(request):
    torch.manual_seed(1)
    return build_model(tiny_model_cfg(**STYLES[request.param]))


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(3)
    return [torch.rand(3, 32, 32, generator=g) if "<image>" in p else None for p in PROMPTS]


def test_batched_greedy_equals_one_at_a_time(model, images):
    kw = dict(max_new_tokens=10, stop_token_ids=[])
    single = [generate_tokens(model, [img], [p], **kw)[0] for img, p in zip(images, PROMPTS)]
    assert generate_tokens(model, images, PROMPTS, **kw) == single
    assert generate_tokens(model, images, PROMPTS, batch_size=2, **kw) == single  # sorted, chunked, reordered
    assert generate(model, images, PROMPTS, **kw) == [model.tokenizer.decode(t, skip_special_tokens=True).strip()
                                                      for t in single]


def test_rows_that_stop_early_leave_the_others_unchanged(model, images):
    free = generate_tokens(model, images, PROMPTS, max_new_tokens=10, stop_token_ids=[])
    stop = free[0][3]  # ends answer 0 after 3 tokens; other rows may stop at it too, at their own step
    single = [generate_tokens(model, [img], [p], max_new_tokens=10, stop_token_ids=[stop])[0]
              for img, p in zip(images, PROMPTS)]
    batched = generate_tokens(model, images, PROMPTS, max_new_tokens=10, stop_token_ids=[stop])
    assert batched == single
    assert len(batched[0]) == 3 and any(len(t) == 10 for t in batched)  # rows really finished at different steps


def test_mismatched_inputs_are_refused_before_any_work(model, images):
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        generate(model, images[:2], PROMPTS[:1])
    with pytest.raises(ValueError, match="prompt 1 .* exceeds the context"):
        generate(model, [None, None], ["hi", "word " * 60], max_new_tokens=8)
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, images, PROMPTS, batch_size=0)
