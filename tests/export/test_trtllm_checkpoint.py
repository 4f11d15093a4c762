"""TensorRT-LLM checkpoint export: layout, config fields, TP split/merge, and a forward from the exported files.

The oracle for names and layouts is an independent re-implementation of TensorRT-LLM's model semantics
(tests/export/trtllm_reference.py) that reads only config.json + rank{N}.safetensors: its logits, with the
image features fed through the emulated prompt table, must match the .nemo model's own logits.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from nemo_neva.export.hf import UnsupportedCheckpoint
from nemo_neva.export.trtllm import write_llm_checkpoint
from nemo_neva.export.trtllm_layout import merge_ranks, trtllm_config
from nemo_neva.export.trtllm_prompt import fake_prompt_ids, prompt_table
from tests.export import trtllm_reference as ref
from tests.export.trtllm_helpers import image_batch, model_logits, tiny_neva
from tests.model.helpers import tiny_model_cfg

# fp32 end to end; the GPT-style model also differs by TensorRT-LLM's tanh GELU vs megatron's erf GELU.
ATOL = {"llama": 2e-5, "gpt": 1e-3}


@pytest.fixture(scope="module", params=["gpt", "llama"])
def exported(request, tmp_path_factory):
    model = tiny_neva(request.param)
    root = tmp_path_factory.mktemp(f"trtllm_{request.param}")
    dirs = {}
    for tp in ((1, 2, 4) if request.param == "llama" else (1, 2)):  # llama tp=4: 2 KV heads are repeated
        dirs[tp] = str(root / f"tp{tp}")
        write_llm_checkpoint(model, dirs[tp], tp_size=tp, dtype="float32")
    return request.param, model, dirs


def _expected_names(cfg):
    names = {"transformer.vocab_embedding.weight", "transformer.ln_f.weight", "lm_head.weight"}
    llama = cfg["architecture"] == "LlamaForCausalLM"
    per_layer = ["input_layernorm", "post_layernorm", "attention.qkv", "attention.dense", "mlp.fc", "mlp.proj"]
    if llama:
        per_layer.append("mlp.gate")
    else:
        names |= {"transformer.position_embedding.weight", "transformer.ln_f.bias"}
    for i in range(cfg["num_hidden_layers"]):
        for n in per_layer:
            names.add(f"transformer.layers.{i}.{n}.weight")
            if not llama:
                names.add(f"transformer.layers.{i}.{n}.bias")
    return names


def test_config_fields(exported):
    kind, model, dirs = exported
    cfg = json.load(open(os.path.join(dirs[2], "config.json")))
    assert cfg["architecture"] == {"llama": "LlamaForCausalLM", "gpt": "GPTForCausalLM"}[kind]
    assert cfg["dtype"] == "float32" and cfg["vocab_size"] == len(model.tokenizer) == 576
    sizes = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["head_size"])
    assert sizes == (64, 2, 4, 16)
    assert cfg["num_key_value_heads"] == (2 if kind == "llama" else 4)
    assert cfg["intermediate_size"] == model.cfg.ffn_hidden_size
    assert cfg["max_position_embeddings"] == model.cfg.encoder_seq_length
    assert cfg["norm_epsilon"] == pytest.approx(1e-5)  # a float through JSON: rounding only
    assert cfg["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert cfg["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None}
    if kind == "llama":
        assert (cfg["hidden_act"], cfg["position_embedding_type"]) == ("silu", "rope_gpt_neox")
        assert cfg["rotary_base"] == model.cfg.rotary_base
    else:
        assert (cfg["hidden_act"], cfg["position_embedding_type"], cfg["bias"]) == ("gelu", "learned_absolute", True)


def test_tensor_names_and_per_rank_shapes(exported):
    _, _, dirs = exported
    for tp, folder in dirs.items():
        cfg = json.load(open(os.path.join(folder, "config.json")))
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        assert files == [f"rank{r}.safetensors" for r in range(tp)]
        d, h, kv = cfg["head_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        for r in range(tp):
            t = load_file(os.path.join(folder, f"rank{r}.safetensors"))
            assert set(t) == _expected_names(cfg)
            assert t["transformer.layers.0.attention.qkv.weight"].shape == ((h // tp + 2 * max(kv // tp, 1)) * d, 64)
            assert t["transformer.layers.0.attention.dense.weight"].shape == (64, h // tp * d)
            assert t["transformer.layers.1.mlp.fc.weight"].shape[0] == cfg["intermediate_size"] // tp
            assert t["transformer.layers.1.mlp.proj.weight"].shape[1] == cfg["intermediate_size"] // tp
            assert t["lm_head.weight"].shape == (cfg["vocab_size"] // tp, 64)
            assert t["transformer.vocab_embedding.weight"].shape == (cfg["vocab_size"], 64)
            assert all(v.dtype == torch.float32 for v in t.values())


def test_tp_split_rejoins_to_tp1_exactly(exported):
    _, _, dirs = exported
    tp1 = load_file(os.path.join(dirs[1], "rank0.safetensors"))
    for tp, folder in dirs.items():
        if tp == 1:
            continue
        cfg, ranks = ref.load_checkpoint(folder)
        merged = merge_ranks(ranks, cfg)
        assert sorted(merged) == sorted(tp1)
        for name in tp1:
            assert torch.equal(merged[name], tp1[name]), (tp, name)


def test_reference_forward_from_exported_files_matches_model(exported):
    kind, model, dirs = exported
    ids, pixels = image_batch(model)
    ours = model_logits(model, ids, pixels)
    with torch.no_grad():
        table = prompt_table(model.model.encode_images(pixels))
    for tp, folder in dirs.items():
        cfg, ranks = ref.load_checkpoint(folder)
        fake = fake_prompt_ids(ids, model.image_token_id, cfg["vocab_size"], per_request=False)
        theirs = ref.forward(cfg, ranks, fake, table)
        assert theirs.shape == ours.shape
        err = (theirs - ours).abs().max().item()
        assert err < ATOL[kind], f"{kind} tp={tp}: max |logit diff| {err}"
    # the comparison has teeth: swapping fc and gate (a plausible layout slip) breaks it
    if kind == "llama":
        cfg, ranks = ref.load_checkpoint(dirs[1])
        swapped = {k.replace("mlp.fc.", "mlp.TMP.").replace("mlp.gate.", "mlp.fc.").replace("mlp.TMP.", "mlp.gate."): v
                   for k, v in ranks[0].items()}
        fake = fake_prompt_ids(ids, model.image_token_id, cfg["vocab_size"])
        assert (ref.forward(cfg, [swapped], fake, table) - ours).abs().max() > 100 * ATOL[kind]


def test_dtype_is_applied(exported, tmp_path):
    _, model, _ = exported
    write_llm_checkpoint(model, str(tmp_path), tp_size=1, dtype="bfloat16")
    t = load_file(str(tmp_path / "rank0.safetensors"))
    assert {v.dtype for v in t.values()} == {torch.bfloat16}
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"


@pytest.mark.parametrize("overrides,tp,message", [
    ({"activation": "geglu"}, 1, "activation='geglu'"),
    ({"normalization": "RMSNorm", "activation": "swiglu", "bias": False}, 1, "position_embedding_type=rope"),
    ({}, 3, "--tp-size 3"),
])
def test_unsupported_models_are_refused(overrides, tp, message):
    with pytest.raises(UnsupportedCheckpoint, match=message):
        trtllm_config(tiny_model_cfg(**overrides), 576, "float16", tp)


# Qwen2 (q/k/v biases, no other bias) and RoPE scaling imported from HF: TensorRT-LLM's LLaMA must be told
# (config attn_bias / rotary_scaling), or it drops the biases and rotates with the unscaled frequencies
LLAMA_VARIANTS = {
    "qwen2_qkv_bias": {"qkv_bias": True},
    "rope_llama3": {"rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "rope_linear": {"rope_scaling": {"type": "linear", "factor": 4.0}},
}


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_llama_variants_export_what_tensorrt_llm_needs(variant, tmp_path):
    """The reference reads attn_bias / rotary_scaling as TensorRT-LLM does; an export that left them at
    False / None gives logits far off the model's (checked below), so this fails before the exporter wrote them."""
    model = tiny_neva("llama", **LLAMA_VARIANTS[variant])
    ids, pixels = image_batch(model)
    ours = model_logits(model, ids, pixels)
    with torch.no_grad():
        table = prompt_table(model.model.encode_images(pixels))
    for tp in (1, 2):
        folder = str(tmp_path / f"tp{tp}")
        write_llm_checkpoint(model, folder, tp_size=tp, dtype="float32")
        cfg, ranks = ref.load_checkpoint(folder)
        fake = fake_prompt_ids(ids, model.image_token_id, cfg["vocab_size"], per_request=False)
        err = (ref.forward(cfg, ranks, fake, table) - ours).abs().max().item()
        assert err < ATOL["llama"], f"{variant} tp={tp}: max |logit diff| {err}"
    # the check has teeth: what the exporter wrote before (no bias, no scaling) is far off
    stale = dict(cfg, attn_bias=False, rotary_scaling=None)
    assert (ref.forward(stale, ranks, fake, table) - ours).abs().max() > 100 * ATOL["llama"]


def test_rope_scaling_on_a_gpt_style_model_is_refused():
    with pytest.raises(UnsupportedCheckpoint, match="rope_scaling"):
        trtllm_config(tiny_model_cfg(position_embedding_type="rope", rope_scaling={"type": "linear", "factor": 2.0}),
                      576, "float16", 1)
