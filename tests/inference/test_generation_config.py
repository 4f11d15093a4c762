"""`GenerationConfig` (nemo_neva/inference/generation_config.py): validated once, as it is made, with one-line
errors naming the setting; frozen and hashable (Triton groups rows by it); `generate` takes it as one object and
gives the same tokens as the same settings spelled as keywords."""
import dataclasses

import pytest

from nemo_neva.inference.generate import generate_tokens
from nemo_neva.inference.generation_config import GenerationConfig


@pytest.mark.parametrize("field, value, message", [
    ("max_new_tokens", 0, "max_new_tokens must be an integer >= 1, got 0"),
    ("max_new_tokens", 2.5, "max_new_tokens must be an integer >= 1, got 2.5"),
    ("temperature", -0.1, r"temperature must be >= 0 \(0 = greedy\), got -0.1"),
    ("temperature", float("nan"), r"temperature must be >= 0 \(0 = greedy\), got nan"),
    ("top_k", -1, r"top_k must be an integer >= 0 \(0 = off\), got -1"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\], got 0.0"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\], got 1.5"),
    ("repetition_penalty", 0, r"repetition_penalty must be > 0 \(1.0 = off\), got 0"),
    ("seed", "7", "seed must be an integer or None, got '7'"),
    ("stop_token_ids", [2, -1], r"stop_token_ids must be token ids \(integers >= 0\), got \[2, -1\]"),
    ("stop_strings", ["</s>", ""], r"stop_strings must be non-empty strings, got \['</s>', ''\]"),
    ("stop_strings", "</s>", "stop_strings must be a list of strings, got the string '</s>'"),
])
def test_bad_settings_are_one_line_errors(field, value, message):
    with pytest.raises(ValueError, match=f"^{message}$") as err:
        GenerationConfig(**{field: value})
    assert "\n" not in str(err.value)


def test_compile_needs_the_cache_and_replace_validates_again():
    with pytest.raises(ValueError, match="^compile_decode compiles the cached decode step; it needs use_cache=True$"):
        GenerationConfig(use_cache=False, compile_decode=True)
    config = GenerationConfig(max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p must be in"):
        config.replace(top_p=2.0)


def test_frozen_hashable_and_lists_become_tuples():
    a = GenerationConfig(stop_token_ids=[3, 2], stop_strings=["x"])
    b = GenerationConfig(stop_token_ids=(3, 2), stop_strings=("x",))
    assert a == b and hash(a) == hash(b) and a.stop_token_ids == (3, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.temperature = 1.0
    assert GenerationConfig().greedy and not GenerationConfig(temperature=0.5).greedy


def test_generate_takes_the_config_as_one_object(model, image):
    prompts = ["<image>\nWhat is it?", "Say something."]
    config = GenerationConfig(max_new_tokens=5, temperature=0.8, top_k=20, top_p=0.9, seed=3, repetition_penalty=1.2)
    as_object = generate_tokens(model, [image, None], prompts, config)
    as_keywords = generate_tokens(model, [image, None], prompts, max_new_tokens=5, temperature=0.8, top_k=20,
                                  top_p=0.9, seed=3, repetition_penalty=1.2)
    assert as_object == as_keywords and all(0 < len(t) <= 5 for t in as_object)
    # keywords lay over a given config
    assert generate_tokens(model, [image], prompts[:1], config, max_new_tokens=2)[0] == as_object[0][:2]
