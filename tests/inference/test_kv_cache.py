"""megatron-core's static KV cache against full recomputation (no cache): the same logits, the same tokens.

Both GPT-style (learned positions, LayerNorm, GELU, biases) and LLaMA-style (RoPE, RMSNorm, SwiGLU,
grouped-query attention) decoders; single prompts and a left-padded batch of different lengths.
"""
import pytest
import torch

from nemo_neva import build_model
from nemo_neva.inference.batching import left_pad
from nemo_neva.inference.generate import encode_prompt, generate, generate_tokens
from nemo_neva.inference.kv_cache import CachedDecoder, RecomputeDecoder
from tests.model.helpers import llama_overrides, tiny_model_cfg

STYLES = {"gpt": {}, "llama_gqa": llama_overrides()}
PROMPTS = ["<image>\nWhat colour is the shape in the middle of this picture?", "<image>\nHi", "Describe a red square."]


@pytest.fixture(scope="module", params=list(STYLES), ids=list(STYLES))
def model(request):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(**STYLES[request.param]))
    model.eval()
    return model


def _inputs(model, n):
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 32, 32, generator=g) if "<image>" in p else None for p in PROMPTS[:n]]
    ids = [encode_prompt(model, p, img is not None) for p, img in zip(PROMPTS[:n], images)]
    rows = [i for i, img in enumerate(images) if img is not None]
    pixels = torch.stack([images[i] for i in rows]) if rows else None
    return ids, pixels, rows


@pytest.mark.parametrize("n", [1, 3], ids=["single", "padded_batch"])
def test_cached_logits_match_recompute_at_every_step(model, n):
    ids, pixels, rows = _inputs(model, n)
    tokens, valid = left_pad(ids)
    if n > 1:
        assert not bool(valid.all())  # the batch really is padded
    steps = 8
    cached = CachedDecoder(model.model, pixels, rows, tokens.shape[1] + steps)
    full = RecomputeDecoder(model.model, pixels, rows)
    vocab = len(model.tokenizer)
    with torch.no_grad():
        a, b = cached.prefill(tokens, valid), full.prefill(tokens, valid)
        # fp32; one new query against cached K/V is other matmul shapes (so other reduction groupings) than the
        # full recompute: measured at most 2.4e-7 on logits of ~0.5-0.75. 2e-5 is ~100x that, still far below
        # what a wrong cache entry moves a logit (~1e-2)
        for _ in range(steps):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
            nxt = b[:, :vocab].argmax(-1)
            a, b = cached.step(nxt), full.step(nxt)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_cached_greedy_tokens_equal_full_recompute(model):
    images = [torch.rand(3, 32, 32), torch.rand(3, 32, 32), None]
    kw = dict(max_new_tokens=12, stop_token_ids=[])
    for image, prompt in zip(images, PROMPTS):
        cached = generate_tokens(model, [image], [prompt], use_cache=True, **kw)
        assert cached == generate_tokens(model, [image], [prompt], use_cache=False, **kw)
        assert len(cached[0]) == 12
    assert generate(model, images, PROMPTS, use_cache=True, **kw) == generate(model, images, PROMPTS,
                                                                                use_cache=False, **kw)


def test_decode_steps_feed_one_token_and_never_rerun_the_vision_tower(model):
    """What makes a decoded token's cost independent of the prompt: after the prefill, each forward pass
    embeds a single new token per row, and the image is encoded once."""
    fed, tower_calls = [], []
    h1 = model.model.language_model.embedding.register_forward_pre_hook(
        lambda mod, args, kwargs: fed.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    h2 = model.model.vision_tower.register_forward_hook(lambda *a: tower_calls.append(1))
    try:
        generate_tokens(model, [torch.rand(3, 32, 32), None], PROMPTS[:1] + PROMPTS[2:], max_new_tokens=6,
                        stop_token_ids=[])
    finally:
        h1.remove()
        h2.remove()
    assert len(fed) == 6 and fed[0][1] > 20  # prefill with the whole padded prompt, then 5 decode steps
    assert all(shape == (2, 1) for shape in fed[1:]), fed
    assert len(tower_calls) == 1


def test_generation_attention_equals_the_training_attention_bit_for_bit(model):
    """Generation (no autograd) and training (autograd) run the same SDPACoreAttention path, grouped K/V
    heads shared through SDPA's enable_gqa in both: the logits must not change in the last bit."""
    ids, pixels, rows = _inputs(model, 3)
    tokens, valid = left_pad(ids)

    def logits():
        return RecomputeDecoder(model.model, pixels, rows).prefill(tokens, valid)

    with torch.no_grad():
        generation = logits()
    training = logits()
    assert training.requires_grad  # really the autograd path
    assert torch.equal(generation, training.detach())


def test_decode_steps_rotate_only_the_new_keys(model, monkeypatch):
    """The cache holds keys after RoPE (`RotatedKVCacheSelfAttention`): a decode step rotates its own query
    and key only, never the cached keys again (megatron-core's plain static path re-rotates the whole cache)."""
    import megatron.core.transformer.attention as mcore_attention

    import nemo_neva.modules.rotated_kv_attention as ours

    rotated = []

    def spy(fn):
        def wrapped(t, freqs, *args, **kwargs):
            rotated.append(t.shape[0])
            return fn(t, freqs, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(ours, "apply_rotary_pos_emb", spy(ours.apply_rotary_pos_emb))
    monkeypatch.setattr(mcore_attention, "apply_rotary_pos_emb", spy(mcore_attention.apply_rotary_pos_emb))
    ids, pixels, rows = _inputs(model, 3)
    tokens, valid = left_pad(ids)
    decoder = CachedDecoder(model.model, pixels, rows, tokens.shape[1] + 4)
    with torch.no_grad():
        decoder.prefill(tokens, valid)
        rotated.clear()
        decoder.step(torch.zeros(3, dtype=torch.long))
        decoder.step(torch.zeros(3, dtype=torch.long))
    uses_rope = model.model.language_model.position_embedding_type == "rope"
    n_layers = model.model.language_model.config.num_layers
    assert rotated == ([1] * (2 * 2 * n_layers) if uses_rope else [])  # q and k, 2 steps, every layer


@pytest.mark.slow  # torch.compile on CPU: tens of seconds per model style
def test_compiled_decode_steps_give_the_eager_tokens(model):
    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.rand(3, 32, 32), None]
    kw = dict(max_new_tokens=8, stop_token_ids=[])
    eager = generate_tokens(model, images, PROMPTS, **kw)
    assert generate_tokens(model, images, PROMPTS, compile_decode=True, **kw) == eager  # a padded batch of 3
    assert generate_tokens(model, images[:1], PROMPTS[:1], compile_decode=True, **kw) == eager[:1]  # reused, b=1


def test_compile_decode_needs_the_cache(model):
    with pytest.raises(ValueError, match="use_cache"):
        generate(model, [None], [PROMPTS[2]], use_cache=False, compile_decode=True)
