"""Which Hugging Face family an exported LLaVA's language model is written in, and its text config.

An LM imported with `model.mm_cfg.llm.from_pretrained` goes back to its own family (the text config it came with,
`model.hf.text_config`). NeVA's own LM goes to the family that computes exactly what megatron-core computes:
  llama  RMSNorm (plain gamma), RoPE (full rotary), SwiGLU, no biases          (GQA, tied or not)
  gpt2   LayerNorm (plain gamma), learned absolute positions, GELU (erf: "gelu"; tanh: "gelu_new"), biases on
         every linear and norm, as many query groups as heads, head size hidden / heads   (tied or not)
Anything else is refused with every field that differs from the nearest of the two. (Which engines serve which
family: hf_engines.py; vLLM's LLaVA cannot run a GPT-2 LM.)
"""
from __future__ import annotations

from omegaconf import OmegaConf

from nemo_neva.pretrained import hf_lm
from nemo_neva.pretrained.weights import UnsupportedCheckpoint

_GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}


def _norm(cfg) -> tuple[str, bool]:
    from nemo_neva.modules.language_model import normalization_settings

    return normalization_settings(cfg)


def _llama_problems(cfg) -> list[str]:
    problems = []
    norm, zero_centered = _norm(cfg)
    if (norm, zero_centered) != ("RMSNorm", False):
        problems.append(f"normalization={cfg.get('normalization', 'LayerNorm')!r}"
                        f"{' with zero-centred gamma' if zero_centered else ''} (HF LLaMA needs plain 'RMSNorm')")
    for key, want, default in (("position_embedding_type", "rope", "learned_absolute"),
                               ("activation", "swiglu", "gelu"), ("bias", False, True),
                               ("rotary_percentage", 1.0, 1.0)):
        if cfg.get(key, default) != want:
            problems.append(f"{key}={cfg.get(key, default)!r} (HF LLaMA needs {want!r})")
    return problems


def _gpt2_problems(cfg) -> list[str]:
    problems = []
    norm, zero_centered = _norm(cfg)
    if (norm, zero_centered) != ("LayerNorm", False):
        problems.append(f"normalization={cfg.get('normalization', 'LayerNorm')!r} (HF GPT-2 needs plain 'LayerNorm')")
    act = cfg.get("activation", "gelu")
    if act not in _GPT2_ACTIVATIONS:
        problems.append(f"activation={act!r} (HF GPT-2 needs 'gelu' or 'gelu_tanh')")
    for key, want, default in (("position_embedding_type", "learned_absolute", "learned_absolute"),
                               ("bias", True, True)):
        if cfg.get(key, default) != want:
            problems.append(f"{key}={cfg.get(key, default)!r} (HF GPT-2 needs {want!r})")
    heads = cfg.num_attention_heads
    if (cfg.get("num_query_groups") or heads) != heads:
        problems.append(f"num_query_groups={cfg.num_query_groups} (HF GPT-2 has no grouped-query attention)")
    if (cfg.get("kv_channels") or cfg.hidden_size // heads) * heads != cfg.hidden_size:
        problems.append(f"kv_channels={cfg.kv_channels} (HF GPT-2's head size is hidden_size / heads)")
    return problems


def export_family(cfg) -> str:
    """The HF family (a key of `hf_lm.LAYOUTS`) the LM of NeVA config `cfg` is written as; raises naming the
    fields when none expresses it."""
    hf_extra = cfg.get("hf") or {}
    source = hf_extra.get("text_model_type")
    if source in hf_lm.LAYOUTS and hf_extra.get("text_config") is not None:
        return source  # imported with llm.from_pretrained: its own family and config
    candidates = {"llama": _llama_problems(cfg), "gpt2": _gpt2_problems(cfg)}
    if not candidates["llama"]:
        return "mistral" if source == "mistral" else "llama"  # (converted from a HF Mistral LLaVA)
    if not candidates["gpt2"]:
        return "gpt2"
    nearest = min(candidates, key=lambda f: len(candidates[f]))
    raise UnsupportedCheckpoint("this model cannot be written as HF LLaVA: no Hugging Face LM family computes "
                                f"NeVA's LM exactly (nearest {nearest}: " + "; ".join(candidates[nearest]) + ")")


def text_config(cfg, tokenizer, vocab_size: int):
    """The HF text config (a `PretrainedConfig`) of the exported LM."""
    from transformers import AutoConfig, GPT2Config, LlamaConfig, MistralConfig

    family = export_family(cfg)
    hf_extra = cfg.get("hf") or {}
    source_text = hf_extra.get("text_config")
    if source_text is not None:
        plain = OmegaConf.to_container(source_text, resolve=True) if OmegaConf.is_config(source_text) \
            else dict(source_text)
        plain["vocab_size"] = vocab_size  # + the tokens NeVA added (<image>, template markers)
        return AutoConfig.for_model(**plain)
    tie = bool(cfg.get("share_embeddings_and_output_weights", False))
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    heads = cfg.num_attention_heads
    eps = float(cfg.get("layernorm_epsilon", 1e-5))
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=int(cfg.encoder_seq_length), n_embd=cfg.hidden_size,
                          n_layer=cfg.num_layers, n_head=heads, n_inner=cfg.ffn_hidden_size,
                          activation_function=_GPT2_ACTIVATIONS[cfg.get("activation", "gelu")],
                          layer_norm_epsilon=eps, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=float(cfg.get("attention_dropout", 0.0)), tie_word_embeddings=tie, **ids)
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_query_groups") or heads,
        head_dim=cfg.get("kv_channels") or cfg.hidden_size // heads, hidden_act="silu",
        max_position_embeddings=cfg.encoder_seq_length, rms_norm_eps=eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.get("rotary_base", 10000))},
        tie_word_embeddings=tie, attention_dropout=float(cfg.get("attention_dropout", 0.0)), **ids)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **kwargs)
    return LlamaConfig(attention_bias=False, mlp_bias=False, **kwargs)
