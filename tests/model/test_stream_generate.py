"""stream_generate is the server's streaming path: its deltas must add up to generate()'s answer."""
import pytest
import torch

from nemo_neva.inference.generate import stream_generate
from nemo_neva import build_model
from tests.model.helpers import tiny_model_cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_model_cfg())


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.0, top_k=50, seed=3)])
def test_stream_deltas_join_to_the_generated_answer(model, sampling):
    image = torch.rand(3, 32, 32)
    prompt = "<image>\nWhat colour is the shape?"
    whole = model.generate([image], [prompt], max_new_tokens=12, stop_token_ids=[], **sampling)[0]
    deltas = list(stream_generate(model, image, prompt, max_new_tokens=12, stop_token_ids=[], **sampling))
    assert len(deltas) >= 2  # random weights never hit EOS (disabled), so 12 tokens come out piece by piece
    assert "".join(deltas).strip() == whole


def test_stream_stops_at_a_stop_string_and_never_leaks_it(model):
    image = torch.rand(3, 32, 32)
    prompt = "<image>\nDescribe."
    full = "".join(stream_generate(model, image, prompt, max_new_tokens=12, stop_token_ids=[]))
    stop = full.strip()[2:4]
    assert stop
    deltas = list(stream_generate(model, image, prompt, max_new_tokens=12, stop_token_ids=[], stop_strings=[stop]))
    text = "".join(deltas)
    assert stop not in text
    assert full.startswith(text)


def test_stream_validates_before_the_first_token(model):
    with pytest.raises(ValueError, match="top_p"):
        next(stream_generate(model, None, "hi", top_p=0.0))
