"""The NeVA language model in TensorRT-LLM's unified checkpoint layout: names, config.json, TP split/merge.

TensorRT-LLM reads `config.json` + `rank{N}.safetensors` (one file per inference TP rank). The tensor
names and per-rank layouts below follow TensorRT-LLM's own converters (models/llama/convert.py,
models/gpt/convert.py) and its model classes (GatedMLP, Attention, PretrainedConfig):

  transformer.vocab_embedding.weight        [vocab, hidden], full on every rank (no parallel embedding)
  transformer.position_embedding.weight     GPT-style with learned absolute positions only
  transformer.layers.{i}.input_layernorm    .weight (+ .bias for LayerNorm)
  transformer.layers.{i}.attention.qkv      [q heads; k heads; v heads] of the rank's heads, stacked
  transformer.layers.{i}.attention.dense    row-parallel: input columns split, bias full on every rank
  transformer.layers.{i}.post_layernorm
  transformer.layers.{i}.mlp.fc             column-parallel; SwiGLU: the *activated* half (megatron's
  transformer.layers.{i}.mlp.gate           first fc1 half, HF gate_proj); mlp.gate: the linear half (up_proj)
  transformer.layers.{i}.mlp.proj           row-parallel like attention.dense
  transformer.ln_f
  lm_head.weight                            rows padded to a multiple of tp, then split by rows

megatron-core stores `linear_qkv` grouped per query group ([q of group g, k_g, v_g] for each g); TensorRT-LLM
wants all q, then all k, then all v, each split by heads across ranks. With fewer KV heads than ranks,
each KV head is repeated so that every rank holds one (as TensorRT-LLM's converters do).
"""
from __future__ import annotations

from typing import Optional

import torch

from nemo_neva.export.hf import UnsupportedCheckpoint, _layer_norm_keys, unpack_qkv

LLAMA = "LlamaForCausalLM"
GPT = "GPTForCausalLM"
_LM = "language_model."
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------ config
def _shape(cfg) -> tuple[int, int, int]:
    heads = cfg.num_attention_heads
    groups = cfg.get("num_query_groups") or heads
    head_dim = cfg.get("kv_channels") or cfg.hidden_size // heads
    return heads, groups, head_dim


def architecture_for(cfg) -> str:
    """LlamaForCausalLM (RoPE, RMSNorm, SwiGLU, no bias) or GPTForCausalLM (LayerNorm, GELU); else refuse."""
    pos = cfg.get("position_embedding_type", "learned_absolute")
    norm, act = cfg.get("normalization", "LayerNorm"), cfg.get("activation", "gelu")
    bias = cfg.get("bias", True)
    if cfg.get("layernorm_zero_centered_gamma", False):
        raise UnsupportedCheckpoint("layernorm_zero_centered_gamma=True has no TensorRT-LLM equivalent here")
    if pos not in ("rope", "learned_absolute"):
        raise UnsupportedCheckpoint(f"position_embedding_type={pos!r}: TensorRT-LLM export supports rope and "
                                    "learned_absolute")
    if norm == "RMSNorm" and act == "swiglu":
        if pos != "rope" or bias or float(cfg.get("rotary_percentage", 1.0)) != 1.0:
            raise UnsupportedCheckpoint("RMSNorm + SwiGLU exports as LlamaForCausalLM, which needs "
                                        "position_embedding_type=rope, rotary_percentage=1.0 and bias=false "
                                        "(qkv_bias=true is fine)")
        return LLAMA
    if norm == "LayerNorm" and act == "gelu":
        if cfg.get("rope_scaling"):
            raise UnsupportedCheckpoint("rope_scaling on a LayerNorm + GELU model: TensorRT-LLM export writes RoPE "
                                        "scaling for LlamaForCausalLM only; export without rope_scaling")
        return GPT
    raise UnsupportedCheckpoint(f"normalization={norm!r} with activation={act!r}: TensorRT-LLM export supports "
                                "RMSNorm+swiglu (LLaMA) and LayerNorm+gelu (GPT)")


def trtllm_config(cfg, vocab_size: int, dtype: str, tp_size: int, quant_algo: Optional[str] = None,
                  kv_cache_quant_algo: Optional[str] = None) -> dict:
    """config.json of the checkpoint (TensorRT-LLM PretrainedConfig fields)."""
    arch = architecture_for(cfg)
    heads, groups, head_dim = _shape(cfg)
    check_tp(heads, groups, tp_size)
    if dtype not in DTYPES:
        raise UnsupportedCheckpoint(f"dtype {dtype!r}; supported: {sorted(DTYPES)}")
    rope = cfg.get("position_embedding_type", "learned_absolute") == "rope"
    out = {
        "architecture": arch,
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": int(vocab_size),
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": int(cfg.num_layers),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(groups),
        "head_size": int(head_dim),
        "intermediate_size": int(cfg.ffn_hidden_size),
        "max_position_embeddings": int(cfg.encoder_seq_length),
        "norm_epsilon": float(cfg.get("layernorm_epsilon", 1e-5)),
        # megatron-core's RoPE rotates the two halves of each head (not interleaved pairs): GPT-NeoX style.
        "position_embedding_type": "rope_gpt_neox" if rope else "learned_absolute",
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": int(tp_size), "tp_size": int(tp_size), "pp_size": 1},
        "quantization": {"quant_algo": quant_algo, "kv_cache_quant_algo": kv_cache_quant_algo},
    }
    if arch == LLAMA:
        # attn_bias: TensorRT-LLM's LLaMA attention then has a qkv bias *and* a dense bias (Qwen2 has only the
        # first; neva_to_trtllm writes the dense one as zeros)
        out.update(hidden_act="silu", rotary_base=float(cfg.get("rotary_base", 10000)),
                   rotary_scaling=rotary_scaling(cfg), mlp_bias=False, attn_bias=bool(cfg.get("qkv_bias", False)),
                   tie_word_embeddings=False)
    else:
        out.update(hidden_act="gelu", bias=bool(cfg.get("bias", True)),
                   rotary_pct=float(cfg.get("rotary_percentage", 1.0)),
                   rotary_base=float(cfg.get("rotary_base", 10000)))
    return out


def rotary_scaling(cfg) -> Optional[dict]:
    """`model.rope_scaling` as TensorRT-LLM's `rotary_scaling` (Hugging Face's rope_scaling form, which its LLaMA
    attention reads: `type`, `factor`, and for llama3 the low/high frequency factors and original context)."""
    scaling = cfg.get("rope_scaling")
    if not scaling:
        return None
    kind = scaling.get("type")
    if kind == "linear":
        return {"type": "linear", "factor": float(scaling["factor"])}
    if kind == "llama3":
        return {"type": "llama3", "factor": float(scaling["factor"]),
                "low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
                "high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
                "original_max_position_embeddings": int(scaling.get("original_max_position_embeddings", 8192))}
    raise UnsupportedCheckpoint(f"rope_scaling.type={kind!r}: TensorRT-LLM export supports linear and llama3")


def check_tp(heads: int, kv_heads: int, tp: int) -> None:
    if tp < 1 or heads % tp:
        raise UnsupportedCheckpoint(f"--tp-size {tp} must divide num_attention_heads={heads}")
    if kv_heads % tp and tp % kv_heads:
        raise UnsupportedCheckpoint(f"--tp-size {tp} and num_query_groups={kv_heads}: one must divide the other")


# ------------------------------------------------------------------------------ megatron -> TRT-LLM (TP=1)
def _bias_key(weight_key: str) -> str:
    return weight_key[: -len("weight")] + "bias"


def neva_to_trtllm(state: dict, cfg, vocab_size: int) -> dict[str, torch.Tensor]:
    """`NevaModule.state_dict()` (TP=1) -> TensorRT-LLM tensor names with the full (unsplit) tensors."""
    arch = architecture_for(cfg)
    heads, groups, head_dim = _shape(cfg)
    keys = set(state)
    embed = state[_LM + "embedding.word_embeddings.weight"]
    if embed.shape[0] < vocab_size:
        raise UnsupportedCheckpoint(f"vocab_size {vocab_size} exceeds the model's {embed.shape[0]} embedding rows")
    out = {"transformer.vocab_embedding.weight": embed[:vocab_size]}
    pos_key = _LM + "embedding.position_embeddings.weight"
    if pos_key in keys:
        out["transformer.position_embedding.weight"] = state[pos_key]
    head = state.get(_LM + "output_layer.weight") if not cfg.get("share_embeddings_and_output_weights") else None
    out["lm_head.weight"] = (embed if head is None else head)[:vocab_size]

    def norm(src_weight_key: str, name: str):
        out[name + ".weight"] = state[src_weight_key]
        if _bias_key(src_weight_key) in keys:
            out[name + ".bias"] = state[_bias_key(src_weight_key)]

    norm(_LM + "decoder.final_layernorm.weight", "transformer.ln_f")
    for i in range(cfg.num_layers):
        p, t = f"{_LM}decoder.layers.{i}.", f"transformer.layers.{i}."
        ln1, ln2 = _layer_norm_keys(keys, i)
        norm(ln1, t + "input_layernorm")
        norm(ln2, t + "post_layernorm")
        qkv = p + "self_attention.linear_qkv."
        out[t + "attention.qkv.weight"] = torch.cat(unpack_qkv(state[qkv + "weight"], heads, groups, head_dim))
        if qkv + "bias" in keys:
            parts = unpack_qkv(state[qkv + "bias"].unsqueeze(-1), heads, groups, head_dim)
            out[t + "attention.qkv.bias"] = torch.cat(parts).squeeze(-1)
            if arch == LLAMA:  # attn_bias=true also gives TensorRT-LLM's LLaMA a dense bias: zero, as Qwen2 has none
                proj = state[p + "self_attention.linear_proj.weight"]
                out[t + "attention.dense.bias"] = proj.new_zeros(proj.shape[0])
        for src, dst in (("self_attention.linear_proj.", "attention.dense."), ("mlp.linear_fc2.", "mlp.proj.")):
            out[t + dst + "weight"] = state[p + src + "weight"]
            if p + src + "bias" in keys:
                out[t + dst + "bias"] = state[p + src + "bias"]
        fc1 = p + "mlp.linear_fc1."
        if arch == LLAMA:  # [gate_proj; up_proj]: silu(fc(x)) * gate(x)
            out[t + "mlp.fc.weight"], out[t + "mlp.gate.weight"] = torch.chunk(state[fc1 + "weight"], 2, dim=0)
        else:
            out[t + "mlp.fc.weight"] = state[fc1 + "weight"]
            if fc1 + "bias" in keys:
                out[t + "mlp.fc.bias"] = state[fc1 + "bias"]
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------- TP split
def _kv_local(kv_heads: int, tp: int) -> int:
    return max(kv_heads // tp, 1)


def _split_qkv(t: torch.Tensor, heads: int, kv: int, d: int, tp: int, rank: int) -> torch.Tensor:
    q, k, v = torch.split(t, [heads * d, kv * d, kv * d], dim=0)
    if kv < tp:  # every rank needs a KV head: repeat each one tp // kv times, in place
        rest = k.shape[1:]
        k = k.reshape(kv, d, *rest).repeat_interleave(tp // kv, dim=0).reshape(-1, *rest)
        v = v.reshape(kv, d, *rest).repeat_interleave(tp // kv, dim=0).reshape(-1, *rest)
    return torch.cat([q.chunk(tp)[rank], k.chunk(tp)[rank], v.chunk(tp)[rank]], dim=0)


def _merge_qkv(parts: list, heads: int, kv: int, d: int, tp: int) -> torch.Tensor:
    q_r, kv_r = heads // tp * d, _kv_local(kv, tp) * d
    qs, ks, vs = zip(*(torch.split(p, [q_r, kv_r, kv_r], dim=0) for p in parts))
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    if kv < tp:
        rep, rest = tp // kv, k.shape[1:]
        k, v = k.reshape(kv, rep, d, *rest), v.reshape(kv, rep, d, *rest)
        if not all(torch.equal(x[:, 0], x[:, j]) for x in (k, v) for j in range(rep)):
            raise ValueError("repeated KV heads differ between ranks")
        k, v = k[:, 0].reshape(-1, *rest), v[:, 0].reshape(-1, *rest)
    return torch.cat([q, k, v], dim=0)


def _rule(name: str) -> tuple[str, int]:
    """How a tensor is laid out across TP ranks: ("qkv"|"split"|"replicate", dim)."""
    if name.endswith(("attention.qkv.weight", "attention.qkv.bias")):
        return "qkv", 0
    if name.endswith(("attention.dense.weight", "mlp.proj.weight")):
        return "split", 1
    if name.endswith(("mlp.fc.weight", "mlp.fc.bias", "mlp.gate.weight", "mlp.gate.bias")) or name == "lm_head.weight":
        return "split", 0
    return "replicate", 0  # norms, embeddings, row-parallel biases, per-tensor scaling factors


def _byte_view(fn, tensors):
    """torch.cat/chunk are not implemented for float8 on every build: move the bytes instead."""
    if tensors[0].dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        dtype = tensors[0].dtype
        out = fn([t.view(torch.uint8) for t in tensors])
        return out.view(dtype) if torch.is_tensor(out) else [o.view(dtype) for o in out]
    return fn(tensors)


def split_for_rank(full: dict, config: dict, rank: int) -> dict[str, torch.Tensor]:
    """Tensors of one TP rank from the full tensors (names as in `neva_to_trtllm`)."""
    tp = config["mapping"]["tp_size"]
    heads, kv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_size"]
    out = {}
    for name, t in full.items():
        how, dim = _rule(name)
        if tp == 1 or how == "replicate":
            out[name] = t.clone()
        elif how == "qkv":
            out[name] = _byte_view(lambda ts: _split_qkv(ts[0], heads, kv, d, tp, rank), [t]).contiguous()
        else:
            if name == "lm_head.weight" and t.shape[0] % tp:
                t = torch.cat([t, t.new_zeros(tp - t.shape[0] % tp, *t.shape[1:])])
            if t.shape[dim] % tp:
                raise UnsupportedCheckpoint(f"{name}: dimension {dim} of size {t.shape[dim]} is not divisible by "
                                            f"tp_size={tp}")
            out[name] = _byte_view(lambda ts: ts[0].chunk(tp, dim=dim)[rank], [t]).contiguous()
    return out


def merge_ranks(ranks: list, config: dict) -> dict[str, torch.Tensor]:
    """Inverse of `split_for_rank` over all ranks: the full tensors back."""
    tp = len(ranks)
    heads, kv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_size"]
    out = {}
    for name in ranks[0]:
        parts = [r[name] for r in ranks]
        how, dim = _rule(name)
        if tp == 1 or how == "replicate":
            if not all(torch.equal(parts[0].view(torch.uint8), p.view(torch.uint8)) for p in parts[1:]):
                raise ValueError(f"{name} should be identical on every rank")
            out[name] = parts[0]
        elif how == "qkv":
            out[name] = _byte_view(lambda ts: _merge_qkv(ts, heads, kv, d, tp), parts)
        else:
            out[name] = _byte_view(lambda ts: torch.cat(ts, dim=dim), parts)
            if name == "lm_head.weight":
                out[name] = out[name][: config["vocab_size"]]
    return out
