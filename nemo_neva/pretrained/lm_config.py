"""A Hugging Face causal-LM `config.json` -> the LM keys of a NeVA model config (and the checks on the way).

Supported architectures: LlamaForCausalLM (incl. `llama3` / `linear` RoPE scaling), MistralForCausalLM (no
sliding window below the context), Qwen2ForCausalLM (q/k/v biases), NemotronForCausalLM (LayerNorm1p,
squared ReLU, partial rotary) and GPT2LMHeadModel (learned positions, LayerNorm, tanh-GELU, biases, tied
embeddings). Anything the megatron-core LM cannot express stops with a one-line message naming the field.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from nemo_neva.pretrained.weights import UnsupportedCheckpoint

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "NemotronForCausalLM": "nemotron", "GPT2LMHeadModel": "gpt2"}
# Keys of `model` that describe the LM's shape: with llm.from_pretrained they come from the checkpoint.
LM_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
           "position_embedding_type", "rotary_base", "rotary_percentage", "rope_scaling", "normalization",
           "layernorm_epsilon", "activation", "bias", "qkv_bias", "share_embeddings_and_output_weights",
           "encoder_seq_length")
_MCORE_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def read_config_json(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.mm_cfg.llm.from_pretrained={folder!r}: no config.json (expected a Hugging "
                                "Face causal-LM folder or a megatron-core GPT checkpoint)")
    with open(path) as f:
        return json.load(f)


def architecture(raw: dict, folder: str) -> str:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    name = archs[0] if archs else f"model_type {raw.get('model_type')!r}"
    raise UnsupportedCheckpoint(f"{folder}: architecture {name} is not supported; supported: "
                                f"{', '.join(ARCHITECTURES)}")


def _rope(text) -> dict:
    """RoPE parameters of a (transformers 5, standardised) config: rope_type, rope_theta, scaling fields."""
    params = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(text, "rope_theta", None) or 10000.0
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _refuse(where: str, field: str, value, why: str):
    raise UnsupportedCheckpoint(f"{where}: {field}={value!r} is not supported ({why})")


def _rope_keys(text, where: str) -> dict:
    rope = _rope(text)
    kind = rope["rope_type"]
    out = {"rotary_base": float(rope["rope_theta"]), "rope_scaling": None}
    if kind == "llama3":
        out["rope_scaling"] = {"type": "llama3", "factor": float(rope["factor"]),
                               **{k: float(rope.get(k, v)) for k, v in _MCORE_LLAMA3.items()}}
    elif kind == "linear":
        out["rope_scaling"] = {"type": "linear", "factor": float(rope["factor"])}
    elif kind != "default":
        _refuse(where, "rope_parameters.rope_type", kind, "supported: default, llama3, linear")
    if rope.get("attention_factor") not in (None, 1.0):
        _refuse(where, "rope_parameters.attention_factor", rope["attention_factor"], "only 1.0")
    partial = rope.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", None))
    out["rotary_percentage"] = float(partial) if partial is not None else 1.0
    return out


def _llama_like(text, family: str, where: str) -> dict:
    heads = text.num_attention_heads
    act = getattr(text, "hidden_act", "silu")
    if family == "nemotron":
        if act != "relu2":
            _refuse(where, "hidden_act", act, "Nemotron: relu2 (squared ReLU) only")
    elif act not in ("silu", "swish"):
        _refuse(where, "hidden_act", act, "silu (SwiGLU) only")
    attn_bias, mlp_bias = bool(getattr(text, "attention_bias", False)), bool(getattr(text, "mlp_bias", False))
    if family == "qwen2":
        attn_bias, mlp_bias = False, False  # q/k/v biases only (qkv_bias below), no o_proj / MLP bias
    if attn_bias != mlp_bias:
        _refuse(where, "attention_bias" if attn_bias else "mlp_bias", True,
                "megatron-core biases either every linear or none; here only one kind has them")
    window = getattr(text, "sliding_window", None)
    if family == "qwen2":
        if getattr(text, "use_sliding_window", False):
            _refuse(where, "use_sliding_window", True, "sliding-window attention")
        types = set(getattr(text, "layer_types", None) or ["full_attention"])
        if types != {"full_attention"}:
            _refuse(where, "layer_types", sorted(types), "full attention in every layer only")
    elif window is not None and window < text.max_position_embeddings:
        _refuse(where, "sliding_window", window, f"sliding-window attention below the context "
                f"max_position_embeddings={text.max_position_embeddings}")
    norm_eps = getattr(text, "norm_eps", None) if family == "nemotron" else getattr(text, "rms_norm_eps", None)
    return {
        "num_layers": text.num_hidden_layers,
        "hidden_size": text.hidden_size,
        "ffn_hidden_size": text.intermediate_size,
        "num_attention_heads": heads,
        "num_query_groups": getattr(text, "num_key_value_heads", None) or heads,
        "kv_channels": getattr(text, "head_dim", None) or text.hidden_size // heads,
        "position_embedding_type": "rope",
        **_rope_keys(text, where),
        "normalization": "LayerNorm1p" if family == "nemotron" else "RMSNorm",
        "layernorm_epsilon": float(norm_eps if norm_eps is not None else 1e-5),
        "activation": "squared-relu" if family == "nemotron" else "swiglu",
        "bias": attn_bias,
        "qkv_bias": family == "qwen2",
        "share_embeddings_and_output_weights": bool(getattr(text, "tie_word_embeddings", False)),
        "encoder_seq_length": int(text.max_position_embeddings),
    }


_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": None, "gelu": "gelu"}


def _gpt2(text, where: str) -> dict:
    act = _GPT2_ACTIVATIONS.get(text.activation_function)
    if act is None:
        _refuse(where, "activation_function", text.activation_function, "gelu_new, gelu_pytorch_tanh or gelu")
    for field, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if bool(getattr(text, field, ok)) != ok:
            _refuse(where, field, getattr(text, field), f"megatron-core attention needs {field}={ok}")
    return {
        "num_layers": text.n_layer, "hidden_size": text.n_embd, "ffn_hidden_size": text.n_inner or 4 * text.n_embd,
        "num_attention_heads": text.n_head, "num_query_groups": text.n_head, "kv_channels": text.n_embd // text.n_head,
        "position_embedding_type": "learned_absolute", "rotary_base": 10000, "rotary_percentage": 1.0,
        "rope_scaling": None, "normalization": "LayerNorm", "layernorm_epsilon": float(text.layer_norm_epsilon),
        "activation": act, "bias": True, "qkv_bias": False,
        "share_embeddings_and_output_weights": bool(getattr(text, "tie_word_embeddings", True)),
        "encoder_seq_length": int(text.n_positions),
    }


def lm_keys_from_hf(text, family: str, where: str) -> dict:
    """NeVA `model.*` LM keys equivalent to the HF text config `text` of `family`."""
    return _gpt2(text, where) if family == "gpt2" else _llama_like(text, family, where)


def tp_sizes_that_work(heads: int, groups: int) -> list[int]:
    return [t for t in range(1, heads + 1) if heads % t == 0 and groups % t == 0]


def check_tp(keys: dict, tp: int, where: str) -> None:
    heads, groups = keys["num_attention_heads"], keys["num_query_groups"] or keys["num_attention_heads"]
    if heads % tp or groups % tp:
        ok = ", ".join(map(str, tp_sizes_that_work(heads, groups)))
        raise ValueError(f"{where}: {heads} attention heads / {groups} query groups are not divisible by "
                         f"tensor_model_parallel_size={tp}; TP sizes that work: {ok}")


def _same(key: str, ours, theirs) -> bool:
    if key == "normalization":
        return str(ours).lower() == str(theirs).lower()
    if isinstance(theirs, float) or isinstance(ours, float):
        try:
            return math.isclose(float(ours), float(theirs), rel_tol=1e-9, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    if isinstance(theirs, dict) or hasattr(ours, "items"):
        ours = dict(ours) if ours is not None else None
        return ours == theirs
    return ours == theirs


def apply_lm_keys(cfg, keys: dict, where: str) -> None:
    """Write `keys` into the model config `cfg` (open_dict'd by the caller). A key the config already sets
    to another value is an error naming both; `encoder_seq_length` may be set shorter than a RoPE LM's context."""
    from omegaconf import OmegaConf

    for key, value in keys.items():
        ours = cfg.get(key)
        if OmegaConf.is_config(ours):
            ours = OmegaConf.to_container(ours, resolve=True)
        if ours is None or _same(key, ours, value):
            cfg[key] = value
            continue
        if key == "encoder_seq_length" and keys["position_embedding_type"] == "rope" and 0 < int(ours) <= value:
            continue  # training on a shorter context than the LM supports is fine with RoPE
        raise ValueError(f"model.{key}={ours!r} contradicts {where} ({key}={value!r} from its config); "
                         f"drop the override: with model.mm_cfg.llm.from_pretrained the LM shape comes from the checkpoint")


def drop_unset_lm_keys(model_cfg, cli_overrides) -> None:
    """For the example scripts: with llm.from_pretrained set, the LM keys the command line did not set are
    cleared (the shipped yaml's values describe the demo LM), so only explicit overrides are compared."""
    from omegaconf import open_dict

    if not ((model_cfg.get("mm_cfg") or {}).get("llm") or {}).get("from_pretrained"):
        return
    given = set()
    for item in cli_overrides or ():
        key = item.split("=", 1)[0].lstrip("+~")
        if key.startswith("model."):
            given.add(key[len("model."):])
    with open_dict(model_cfg):
        for key in LM_KEYS:
            if key not in given:
                model_cfg[key] = None
        if "tokenizer.path" not in given and model_cfg.get("tokenizer") is not None:
            model_cfg.tokenizer.path = None  # the LM's own


def hydra_cli_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # not under hydra
        return []


def text_config_dict(text) -> dict[str, Any]:
    """The HF text config as plain data for `model.hf.text_config` (used again on export)."""
    d = text.to_dict()
    for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "auto_map"):
        d.pop(key, None)
    return json.loads(json.dumps(d))  # plain JSON types only


def source_dtype(raw: dict) -> Optional[str]:
    name = raw.get("dtype") or raw.get("torch_dtype")
    return str(name).replace("torch.", "") if name else None
