"""Checkpoint interchange between Hugging Face `LlavaForConditionalGeneration` (and
`LlavaNextForConditionalGeneration`: anyres tiling, `image_grid_pinpoints`, `image_newline`) and a NeVA `.nemo`.

Supported: a CLIP or SigLIP vision tower, the LLaVA-1.5 projector (`linear_1` -> GELU -> `linear_2`, our
`mlp2x_gelu`) and a LLaMA-family language model (llama / mistral without a sliding window): RoPE,
RMSNorm, SwiGLU, no biases, with or without grouped-query attention, tied or untied embeddings.

The language model's tensors go through the causal-LM tables of `nemo_neva.pretrained.hf_lm` (the same
code that loads `model.mm_cfg.llm.from_pretrained`), under LLaVA's `language_model.` prefix:
  q/k/v_proj          -> `linear_qkv`: rows grouped per query group as [q heads of the group, k, v]
  gate_proj, up_proj  -> `linear_fc1`: [gate; up] (SwiGLU)
  embed_tokens/lm_head-> `word_embeddings`/`output_layer`: padded with zero rows to a multiple of
                         `make_vocab_size_divisible_by`; the padding is dropped again on export
Everything else is a rename. Weights are read lazily from safetensors; a pickle `.bin` checkpoint is only
read when the caller says it trusts it. A .nemo whose LM came from a HF causal LM (any family that
`from_pretrained` takes) exports with that LM's own text config and tensor names.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from omegaconf import OmegaConf

from nemo_neva.data.image_io import hf_processor_for
from nemo_neva.export.hf_import import convert_hf_to_nemo, load_hf_llava_into_neva  # noqa: F401  (the API)
from nemo_neva.export.hf_layout import (  # noqa: F401  (the API, and what the TRT-LLM export reads)
    _EXPORT_DTYPES, _VISION_KINDS, LLAMA_FAMILY, _layer_norm_keys, canonical_key, check_hf_config, lm_table,
    neva_to_hf_state, nemo_config_from_hf, read_hf_weights)
from nemo_neva.pretrained import hf_lm
from nemo_neva.pretrained.hf_lm import pack_qkv, unpack_qkv  # noqa: F401  (also used by the TRT-LLM export)
from nemo_neva.pretrained.weights import UnsupportedCheckpoint

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ .nemo -> HF
def hf_config_from_neva(model):
    """LlavaConfig equivalent to a (LLaMA-style, mlp2x_gelu) MegatronNevaModel; raises if there is none."""
    from transformers import LlamaConfig, MistralConfig

    from nemo_neva.modules.language_model import normalization_settings

    cfg = model.cfg
    problems = []
    hf_extra = cfg.get("hf") or {}
    source_text = hf_extra.get("text_config")  # the LM came from a HF causal LM: its own config and layout
    if source_text is not None and hf_lm.LAYOUTS.get(hf_extra.get("text_model_type")) != "llama":
        problems.append(f"language model {hf_extra.get('text_model_type')!r} (transformers' LLaVA takes LMs with "
                        "the Llama tensor layout: llama, mistral, qwen2, nemotron)")
    elif source_text is None:
        norm, zero_centered = normalization_settings(cfg)  # any spelling of plain RMSNorm is fine
        if (norm, zero_centered) != ("RMSNorm", False):
            problems.append(f"normalization={cfg.get('normalization', 'LayerNorm')!r}"
                            f"{' with zero-centred gamma' if zero_centered else ''} (HF LLaMA needs plain 'RMSNorm')")
        for key, want, default in (("position_embedding_type", "rope", "learned_absolute"),
                                   ("activation", "swiglu", "gelu"), ("bias", False, True),
                                   ("rotary_percentage", 1.0, 1.0)):
            if cfg.get(key, default) != want:
                problems.append(f"{key}={cfg.get(key, default)!r} (HF LLaMA needs {want!r})")
    if (cfg.get("peft") or {}).get("peft_scheme"):
        problems.append("the model has unmerged LoRA adapters (merge them first: scripts/merge_lora.py)")
    adapter = cfg.mm_cfg.mm_mlp_adapter_type
    if adapter != "mlp2x_gelu":
        problems.append(f"projector mm_mlp_adapter_type={adapter!r} (HF LLaVA's projector is "
                        f"linear_1 -> GELU -> linear_2, i.e. mlp2x_gelu)")
    if problems:
        raise UnsupportedCheckpoint("this model cannot be written as HF LLaVA: " + "; ".join(problems))
    vision = model.vision_config
    kind = _VISION_KINDS.get(vision.model_type)
    if kind is None:
        raise UnsupportedCheckpoint(f"vision tower {vision.model_type!r}: only CLIP / SigLIP")
    venc = cfg.mm_cfg.vision_encoder
    drop_cls = venc.get("drop_cls", True) and kind == "clip"
    vocab_size = int(hf_extra.get("vocab_size") or len(model.tokenizer))
    heads = cfg.num_attention_heads
    tok = model.tokenizer
    tie = bool(cfg.get("share_embeddings_and_output_weights", False))
    if source_text is not None:
        from transformers import AutoConfig

        plain = OmegaConf.to_container(source_text, resolve=True) if OmegaConf.is_config(source_text) \
            else dict(source_text)
        plain["vocab_size"] = vocab_size  # + the tokens NeVA added (<image>, template markers)
        text = AutoConfig.for_model(**plain)
        return _llava_config(model, text, tie, drop_cls, venc), vocab_size, drop_cls
    text_kwargs = dict(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_query_groups") or heads,
        head_dim=cfg.get("kv_channels") or cfg.hidden_size // heads, hidden_act="silu",
        max_position_embeddings=cfg.encoder_seq_length, rms_norm_eps=float(cfg.get("layernorm_epsilon", 1e-5)),
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.get("rotary_base", 10000))},
        tie_word_embeddings=tie, attention_dropout=float(cfg.get("attention_dropout", 0.0)),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    if hf_extra.get("text_model_type") == "mistral":
        text = MistralConfig(sliding_window=None, **text_kwargs)
    else:
        text = LlamaConfig(attention_bias=False, mlp_bias=False, **text_kwargs)
    return _llava_config(model, text, tie, drop_cls, venc), vocab_size, drop_cls


def _llava_config(model, text, tie: bool, drop_cls: bool, venc):
    """LlavaConfig, or for a tiled model (`model.mm_cfg.image_tiling`) LlavaNextConfig with its grid pinpoints."""
    from transformers import LlavaConfig, LlavaNextConfig

    tiling = getattr(model, "tiling", None)
    cls, extra = (LlavaConfig, {}) if tiling is None else \
        (LlavaNextConfig, {"image_grid_pinpoints": [list(p) for p in tiling.pinpoints]})
    config = cls(
        vision_config=model.vision_config.to_dict(), text_config=text.to_dict(),
        image_token_index=model.image_token_id, image_seq_length=model.tokens_per_image, projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if drop_cls else "full",
        vision_feature_layer=int(venc.get("vision_select_layer", -2)), multimodal_projector_bias=True,
        tie_word_embeddings=tie, **extra,
    )
    config.architectures = ["LlavaForConditionalGeneration" if tiling is None else "LlavaNextForConditionalGeneration"]
    return config


def _processor(model, drop_cls: bool):
    """LlavaProcessor (or LlavaNextProcessor for a tiled model) whose image processor makes the model's own
    pixels by itself (its image_aspect_ratio, or its tiles) and which inserts the model's placeholder counts."""
    from transformers import LlavaNextProcessor, LlavaProcessor

    tiling = getattr(model, "tiling", None)
    if tiling is None:
        cls, image_processor = LlavaProcessor, hf_processor_for(model.image_processor, model.image_aspect_ratio)
    else:
        from nemo_neva.modules.tiling import processor_for

        cls, image_processor = LlavaNextProcessor, processor_for(model.image_processor, tiling)
    kind = _VISION_KINDS[model.vision_config.model_type]
    return cls(image_processor=image_processor, tokenizer=model.tokenizer, patch_size=model.vision_config.patch_size,
               vision_feature_select_strategy="default" if drop_cls else "full",
               num_additional_image_tokens=1 if kind == "clip" else 0, image_token="<image>")


def export_neva_to_hf(model, output_dir: str, dtype: Optional[str] = None) -> str:
    """Write config.json, model.safetensors, tokenizer and processor files of an HF LLaVA model (LLaVA-NeXT for a
    model with `model.mm_cfg.image_tiling`).

    `dtype` (float32 | bfloat16 | float16): of the written tensors; default: the dtype of the HF checkpoint
    the .nemo was converted from (so a bf16 checkpoint goes back to bf16 bit for bit), else float32.
    """
    from safetensors.torch import save_file

    config, vocab_size, drop_cls = hf_config_from_neva(model)
    if getattr(model, "frame_pool", None) is not None:
        log.warning("model.mm_cfg.video.pool: Hugging Face LLaVA takes images only; the exported model has no video "
                    "input (frames given to it as images would not be pooled)")
    dtype = dtype or (model.cfg.get("hf") or {}).get("dtype") or "float32"
    if dtype not in _EXPORT_DTYPES:
        raise UnsupportedCheckpoint(f"export dtype {dtype!r}; supported: {sorted(_EXPORT_DTYPES)}")
    config.dtype = dtype
    state = {k: v for k, v in model.model.state_dict().items()
             if torch.is_tensor(v) and not k.endswith("_extra_state")}
    tensors = {k: v.to(_EXPORT_DTYPES[dtype]) for k, v in neva_to_hf_state(state, model.cfg, vocab_size).items()}
    os.makedirs(output_dir, exist_ok=True)
    config.save_pretrained(output_dir)
    save_file(tensors, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
    _processor(model, drop_cls).save_pretrained(output_dir)
    return output_dir


def export_nemo_to_hf(nemo_path: str, output_dir: str, dtype: Optional[str] = None) -> str:
    """Restore a .nemo (any TP/PP layout: on one process it is resharded to TP=PP=1) and export it."""
    from nemo_neva import MegatronNevaModel

    if not os.path.isfile(nemo_path):
        raise FileNotFoundError(f"{nemo_path}: no such .nemo file")
    model = MegatronNevaModel.restore_from(nemo_path)
    hf_config_from_neva(model)  # refuse before writing anything
    return export_neva_to_hf(model, output_dir, dtype)
