"""Sampling controls. Oracles: transformers' RepetitionPenaltyLogitsProcessor and
LlavaForConditionalGeneration.generate on the same weights (exported with nemo_neva.export.hf)."""
import pytest
import torch

from nemo_neva.export.hf import export_neva_to_hf
from nemo_neva.inference.generate import encode_prompt, generate, generate_tokens, stream_generate
from nemo_neva.inference.sampling import apply_repetition_penalty

PROMPT = "<image>\nWhat colour is the shape?"


@pytest.mark.parametrize("penalty", [0.7, 1.0, 1.8])
def test_repetition_penalty_matches_transformers(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    history = torch.randint(0, 50, (3, 12), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, penalty), expected, atol=0, rtol=0)


def test_greedy_with_repetition_penalty_matches_hf_generate(model, image, tmp_path):
    from transformers import LlavaForConditionalGeneration

    export_neva_to_hf(model, str(tmp_path))
    hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = encode_prompt(model, PROMPT, True)[None]
    ours = {}
    for penalty in (1.0, 0.5, 1.5):
        theirs = hf.generate(input_ids=ids, pixel_values=image[None], max_new_tokens=12, do_sample=False,
                             repetition_penalty=penalty, eos_token_id=None, pad_token_id=0)
        ours[penalty] = generate_tokens(model, [image], [PROMPT], max_new_tokens=12, stop_token_ids=[],
                                        repetition_penalty=penalty)[0]
        assert ours[penalty] == theirs[0, ids.shape[1]:].tolist(), penalty
    assert ours[0.5] != ours[1.0]  # the penalty really changed the answer, in both directions checked


@pytest.mark.parametrize("penalty", [0.0, -1.0])
def test_repetition_penalty_must_be_positive(model, penalty):
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        generate(model, [None], ["hi"], repetition_penalty=penalty)
    with pytest.raises(ValueError, match="repetition_penalty"):
        next(stream_generate(model, None, "hi", repetition_penalty=penalty))


def test_seeded_sampling_is_reproducible_and_seed_dependent(model, image):
    kw = dict(max_new_tokens=10, stop_token_ids=[], temperature=1.5, top_p=0.95)
    first = generate_tokens(model, [image], [PROMPT], seed=11, **kw)
    assert generate_tokens(model, [image], [PROMPT], seed=11, **kw) == first
    others = [generate_tokens(model, [image], [PROMPT], seed=s, **kw) for s in (12, 13)]
    assert any(o != first for o in others)
    # A seeded answer does not depend on the other requests of its batch.
    batched = generate_tokens(model, [None, image], ["Hello there", PROMPT], seed=11, **kw)
    assert batched[1] == first[0]


def test_temperature_zero_is_greedy_whatever_the_other_settings(model, image):
    greedy = generate_tokens(model, [image], [PROMPT], max_new_tokens=8, stop_token_ids=[])
    assert generate_tokens(model, [image], [PROMPT], max_new_tokens=8, stop_token_ids=[], temperature=0.0,
                           top_k=3, top_p=0.5, seed=99) == greedy
    assert generate_tokens(model, [image], [PROMPT], max_new_tokens=8, stop_token_ids=[], temperature=1.0,
                           top_k=1, seed=5) == greedy


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45])
def test_a_tiny_temperature_samples_the_top_token_instead_of_failing(temperature):
    """Found by the server's schema fuzzer: a temperature that underflows float32 made inf / inf = NaN
    probabilities (torch.multinomial raised); it must act like greedy decoding."""
    from nemo_neva.inference.sampling import sample_next

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 10
    logits[:, 7] = float("-inf")  # masked entries (the image placeholder) stay impossible
    for top_p in (1.0, 0.5):
        chosen = sample_next(logits, temperature, 0, top_p, torch.Generator().manual_seed(1))
        assert torch.equal(chosen, logits.argmax(-1))
