"""NeVA's LM from a Hugging Face causal LM (`model.mm_cfg.llm.from_pretrained`): transformers is the oracle.

Tiny random checkpoints of every supported family (written with save_pretrained, each with a tokenizer of its
own kind) must give text-only logits equal to `AutoModelForCausalLM`'s on the same ids, at TP=1 and TP=2, load
the right layers on each PP stage, stay bit-identical through stage 1, and export back as an HF LLaVA whose
language model is the source tensor for tensor.
"""
import os

import pytest
import torch
from safetensors.torch import load_file

from nemo_neva import build_model
from tests.pretrained.lm_helpers import (FAMILIES, lm_logits, make_tiny_lm, neva_cfg, parallel_lm_worker,
                                         probe_ids)

# fp32 on both sides, same weights: the four RoPE families agree to the last bit here, GPT-2 (a tanh GELU and a
# different matmul order in Conv1D) to ~1e-6. 1e-4 leaves room for other CPUs' kernels and for TP=2's reordered
# all-reduce sums while still catching any mis-mapped tensor (those move logits by ~1e-1).
ATOL = 1e-4


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    out = {}
    for family in FAMILIES:
        path = str(root / family)
        out[family] = (path, make_tiny_lm(family, path))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_text_logits_match_transformers(family, lm_dirs):
    path, hf = lm_dirs[family]
    model = build_model(neva_cfg(path))
    vocab = hf.config.vocab_size
    ids = probe_ids(vocab)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(lm_logits(model, ids)[..., :vocab], theirs, atol=ATOL, rtol=0)


def test_shape_and_tokenizer_come_from_the_checkpoint(lm_dirs):
    path, hf = lm_dirs["llama"]
    model = build_model(neva_cfg(path))
    cfg, text = model.cfg, hf.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads, cfg.num_query_groups,
            cfg.kv_channels, cfg.rotary_base, cfg.encoder_seq_length) == (2, 64, 96, 4, 2, 16, 5000.0, 64)
    assert (cfg.normalization, cfg.activation, cfg.bias, cfg.position_embedding_type) == ("RMSNorm", "swiglu",
                                                                                          False, "rope")
    # the LM's own SentencePiece-style tokenizer, + <image> as one special token, vocab padded to 128s
    assert type(model.tokenizer).__name__.startswith("Llama") and len(model.tokenizer) == text.vocab_size + 1
    assert model.image_token_id == text.vocab_size and list(cfg.hf.added_tokens) == ["<image>"]
    emb = model.model.language_model.embedding.word_embeddings.weight
    assert emb.shape[0] == 512 and cfg.hf.vocab_size == text.vocab_size + 1
    src = hf.model.embed_tokens.weight
    assert torch.equal(emb[:text.vocab_size], src)
    torch.testing.assert_close(emb[model.image_token_id], src.mean(0), rtol=0, atol=1e-6)  # mean init, fp64 sum
    out = model.model.language_model.output_layer.weight
    torch.testing.assert_close(out[model.image_token_id], hf.lm_head.weight.mean(0), rtol=0, atol=1e-6)
    assert not emb[text.vocab_size + 1:].any()  # TP padding rows stay zero


def test_tp2_logits_match_transformers(lm_dirs, tmp_path):
    from tests.parallel.mp_utils import run_ranks

    fams = ("llama", "gpt2")  # grouped-query RoPE + SwiGLU; fused transposed c_attn + learned positions
    ids = probe_ids(300)
    ranks = run_ranks(parallel_lm_worker, 2, str(tmp_path), [lm_dirs[f][0] for f in fams], 2, 1, ids)
    for family in fams:
        path, hf = lm_dirs[family]
        with torch.no_grad():
            theirs = hf(input_ids=ids).logits
        for r in ranks:
            torch.testing.assert_close(r[path][..., :hf.config.vocab_size], theirs, atol=ATOL, rtol=0)


def test_pp2_stages_load_their_own_layers(lm_dirs, tmp_path):
    from tests.parallel.mp_utils import run_ranks

    # (tied embeddings at PP>1 need CUDA in megatron-core 0.16.1's embedding sync: untied here)
    path, _ = lm_dirs["nemotron"]
    reference = {k: v.detach() for k, v in build_model(neva_cfg(path)).model.language_model.named_parameters()}
    stages = run_ranks(parallel_lm_worker, 2, str(tmp_path), [path], 1, 2, None)
    seen = set()
    for stage, params in (r[path] for r in stages):
        assert any(k.startswith(f"decoder.layers.{stage}.") for k in params)
        for name, value in params.items():
            want = reference[name]
            assert torch.equal(value, want), name
            seen.add(name)
    assert set(reference) <= seen


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied; tied with q/k/v biases and byte-level BPE
def test_stage1_keeps_the_lm_and_export_gives_it_back(family, lm_dirs, tmp_path):
    from nemo_neva.export.hf import export_nemo_to_hf

    path, hf = lm_dirs[family]
    model = build_model(neva_cfg(path, **{"data.conv_template": "plain"}))
    lm_before = {k: v.detach().clone() for k, v in model.model.language_model.state_dict().items()
                 if torch.is_tensor(v)}
    proj_before = [p.detach().clone() for p in model.model.projector.parameters()]
    model.setup_training_data(model.cfg.data)  # the shipped stage-1 captions, tokenised by the LM's tokenizer
    assert not model._train_ds.skip_counts, model._train_ds.summary()
    model.train()
    opt = model.configure_optimizers()
    for _, batch in zip(range(2), model._train_dl):
        assert torch.isfinite(model.train_on_batch(batch, opt))
    after = model.model.language_model.state_dict()
    assert all(torch.equal(lm_before[k], after[k]) for k in lm_before)  # frozen: bit-identical
    assert any(not torch.equal(a, b) for a, b in zip(proj_before, model.model.projector.parameters()))
    nemo = str(tmp_path / "stage1.nemo")
    model.save_to(nemo)
    out = str(tmp_path / "hf")
    export_nemo_to_hf(nemo, out)
    exported = load_file(os.path.join(out, "model.safetensors"))
    source = load_file(os.path.join(path, "model.safetensors"))
    base = "model."
    vocab = hf.config.vocab_size
    for key, value in source.items():
        ours = exported[("language_model.lm_head.weight" if key == "lm_head.weight"
                         else "language_model.model." + key[len(base):])]
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert ours.shape[0] == vocab + 1  # + <image>
            ours = ours[:vocab]
        assert ours.dtype == value.dtype and torch.equal(ours, value), key
    lm_keys = [k for k in exported if k.startswith("language_model.")]
    assert len(lm_keys) == len(source)
    from transformers import LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ids = probe_ids(vocab, seed=3)
    with torch.no_grad():  # the exported LLaVA's language model answers text like the source LM
        torch.testing.assert_close(llava(input_ids=ids).logits[..., :vocab], hf(input_ids=ids).logits,
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},  # not megatron-core's fixed 8192: its scaling function, our args
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},  # Llama 3.2's values: GPTModel's own rope_scaling path
    {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0},
], ids=["llama3_short_context", "llama3_2", "linear"])
def test_rope_scaling_logits_match_transformers(rope, tmp_path):
    path = str(tmp_path / "lm")
    hf = make_tiny_lm("llama", path, rope_parameters=rope)
    model = build_model(neva_cfg(path))
    assert model.cfg.rope_scaling.type == rope["rope_type"]
    ids = probe_ids(hf.config.vocab_size, seq=40)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(lm_logits(model, ids)[..., :hf.config.vocab_size], theirs, atol=ATOL, rtol=0)
    from transformers import AutoModelForCausalLM

    unscaled = AutoModelForCausalLM.from_pretrained(
        path, rope_parameters={"rope_type": "default", "rope_theta": rope["rope_theta"]}).eval()
    with torch.no_grad():  # the scaling matters at these positions (so the match above means something)
        assert (unscaled(input_ids=ids).logits - theirs).abs().max() > 10 * ATOL
