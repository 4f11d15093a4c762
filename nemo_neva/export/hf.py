"""Checkpoint interchange between Hugging Face `LlavaForConditionalGeneration` and a NeVA `.nemo`.

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

import json
import logging
import os
import re
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from nemo_neva.data.image_io import hf_processor_for, mode_of_hf_processor
from nemo_neva.pretrained import hf_lm
from nemo_neva.pretrained.hf_lm import pack_qkv, unpack_qkv  # noqa: F401  (also used by the TRT-LLM export)
from nemo_neva.pretrained.lm_config import lm_keys_from_hf
from nemo_neva.pretrained.weights import UnsupportedCheckpoint, open_weights, read_all

log = logging.getLogger(__name__)

LLAMA_FAMILY = ("llama", "mistral")
_VISION_KINDS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
# HF keys of the checkpoint, in the layout transformers 5 `save_pretrained` writes for LLaVA.
_LM = "language_model.model."
_LM_HEAD = "language_model.lm_head.weight"
_VISION = "vision_tower."
_PROJ = "multi_modal_projector."
# Other spellings found in LLaVA checkpoints (older llava-hf uploads, in-memory module names).
_ALIASES = [
    (re.compile(r"^model\.language_model\."), _LM),
    (re.compile(r"^lm_head\.weight$"), _LM_HEAD),
    (re.compile(r"^model\.vision_tower\."), _VISION),
    (re.compile(r"^model\.multi_modal_projector\."), _PROJ),
    (re.compile(r"^vision_tower\.vision_model\."), _VISION),
]
_NEVA_LM = "language_model."
_NEVA_VISION = "vision_tower.model."
_PROJECTOR_MAP = {"projector.0.weight": _PROJ + "linear_1.weight", "projector.0.bias": _PROJ + "linear_1.bias",
                  "projector.2.weight": _PROJ + "linear_2.weight", "projector.2.bias": _PROJ + "linear_2.bias"}


# --------------------------------------------------------------------------------------------- reading HF
def canonical_key(key: str) -> str:
    for pattern, repl in _ALIASES:
        if pattern.search(key):
            return pattern.sub(repl, key, count=1)
    return key


def read_hf_weights(input_dir: str, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint directory, keys in the canonical (save_pretrained) spelling."""
    return read_all(open_weights(input_dir, trust_pickle, rename=canonical_key))


def _rope_theta_and_type(text_config) -> tuple[float, str]:
    params = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(text_config, "rope_theta", None))
    kind = params.get("rope_type", params.get("type", "default"))
    return float(theta if theta is not None else 10000.0), kind


def _image_token_id(config) -> int:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise UnsupportedCheckpoint("the LLaVA config names no image_token_index")


def check_hf_config(config) -> None:
    """Raise UnsupportedCheckpoint naming what this converter cannot map."""
    if getattr(config, "model_type", None) != "llava":
        raise UnsupportedCheckpoint(f"model_type {getattr(config, 'model_type', None)!r}: only 'llava' "
                                    "(LlavaForConditionalGeneration) checkpoints are supported")
    text, vision = config.text_config, config.vision_config
    if text.model_type not in LLAMA_FAMILY:
        raise UnsupportedCheckpoint(f"language model type {text.model_type!r} is not supported; "
                                    f"supported: LLaMA-family {LLAMA_FAMILY}")
    if vision.model_type not in _VISION_KINDS:
        raise UnsupportedCheckpoint(f"vision tower type {vision.model_type!r} is not supported; "
                                    f"supported: {sorted(_VISION_KINDS)} (CLIP / SigLIP)")
    if getattr(text, "hidden_act", "silu") != "silu":
        raise UnsupportedCheckpoint(f"LM hidden_act {text.hidden_act!r}: only silu (SwiGLU) is supported")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(text, flag, False):
            raise UnsupportedCheckpoint(f"LM {flag}=True is not supported (megatron bias applies to all linears)")
    _, rope_type = _rope_theta_and_type(text)
    if rope_type != "default":
        raise UnsupportedCheckpoint(f"RoPE scaling {rope_type!r} is not supported; only plain RoPE")
    window = getattr(text, "sliding_window", None)
    if window is not None and window < text.max_position_embeddings:
        raise UnsupportedCheckpoint(f"sliding-window attention (sliding_window={window}) is not supported")
    if config.projector_hidden_act != "gelu":
        raise UnsupportedCheckpoint(f"projector_hidden_act {config.projector_hidden_act!r}: only gelu "
                                    "(mlp2x_gelu) is supported")
    if not isinstance(config.vision_feature_layer, int):
        raise UnsupportedCheckpoint(f"vision_feature_layer={config.vision_feature_layer!r}: only a single layer "
                                    "is supported")
    if config.vision_feature_select_strategy not in ("default", "full"):
        raise UnsupportedCheckpoint(f"vision_feature_select_strategy "
                                    f"{config.vision_feature_select_strategy!r} is not supported")
    if config.vision_feature_select_strategy == "default" and _VISION_KINDS[vision.model_type] == "siglip":
        # HF's "default" drops the first feature whatever the tower; SigLIP has no CLS, so that is a real patch,
        # which NeVA keeps: the two would disagree by one image token.
        raise UnsupportedCheckpoint("vision_feature_select_strategy='default' with a SigLIP tower drops SigLIP's "
                                    "first patch (it has no CLS token), which NeVA keeps; only 'full' is supported "
                                    "for SigLIP")


_EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype) -> str:
    """The checkpoint's dtype as a name ("float32" when unknown); the .nemo itself always computes in fp32."""
    name = str(dtype or "float32").replace("torch.", "")
    return name if name in _EXPORT_DTYPES else "float32"


def nemo_config_from_hf(config, tokenizer_dir: str, make_vocab_size_divisible_by: int = 128) -> DictConfig:
    """A complete `MegatronNevaModel` config (LLaMA-style LM) equivalent to a HF LLaVA config."""
    check_hf_config(config)
    text, vision = config.text_config, config.vision_config
    vision_overrides = {k: v for k, v in vision.to_diff_dict().items()
                        if k not in ("model_type", "transformers_version", "architectures", "dtype", "torch_dtype")}
    lm = lm_keys_from_hf(text, text.model_type, "the LLaVA's language model")
    lm["share_embeddings_and_output_weights"] = bool(lm["share_embeddings_and_output_weights"]
                                                     or getattr(config, "tie_word_embeddings", False))
    cfg = {
        "target": "nemo_neva.models.neva_model.MegatronNevaModel",
        "seed": 1234,
        "micro_batch_size": 1,
        "global_batch_size": 1,
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "sequence_parallel": False,
        **lm,
        "hidden_dropout": 0.0,
        "attention_dropout": float(getattr(text, "attention_dropout", 0.0) or 0.0),
        "init_method_std": float(getattr(text, "initializer_range", 0.02)),
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "transformer_engine": False,
        "tokenizer": {"path": os.path.abspath(tokenizer_dir)},
        "mm_cfg": {
            "mm_mlp_adapter_type": "mlp2x_gelu",
            "llm": {"freeze": False},
            "vision_encoder": {
                "from_pretrained": None,
                "model_type": _VISION_KINDS[vision.model_type],
                "config": vision_overrides,
                "vision_select_layer": int(config.vision_feature_layer),
                "drop_cls": config.vision_feature_select_strategy == "default",
                "freeze": True,
            },
        },
        "data": {"data_path": None, "validation_data_path": None, "image_folder": None, "conv_template": "plain",
                 "image_aspect_ratio": "square", "seq_length": None, "num_workers": 0, "strict": False},
        "optim": {"name": "adam", "lr": 2e-5, "weight_decay": 0.0, "betas": [0.9, 0.98], "clip_grad": 1.0,
                  "sched": {"name": "CosineAnnealing", "warmup_steps": 0, "min_lr": 2e-6}},
        # What the HF side had that the NeVA config does not say (used again on export).
        "hf": {"vocab_size": int(text.vocab_size), "text_model_type": text.model_type,
               "dtype": _dtype_name(getattr(config, "dtype", None) or getattr(text, "dtype", None))},
    }
    return OmegaConf.create(cfg)


# ------------------------------------------------------------------------------------ tensor layout maps
def _layer_norm_keys(neva_keys, i: int) -> tuple[str, str]:
    """Local spec: separate norms; TE spec: norms fused into linear_qkv / linear_fc1."""
    p = f"{_NEVA_LM}decoder.layers.{i}."
    if p + "input_layernorm.weight" in neva_keys:
        return p + "input_layernorm.weight", p + "pre_mlp_layernorm.weight"
    return p + "self_attention.linear_qkv.layer_norm_weight", p + "mlp.linear_fc1.layer_norm_weight"


def lm_table(cfg):
    """The LM tensor table of a NeVA config, under LLaVA's keys (the HF layout of the LM it came from)."""
    layout = hf_lm.LAYOUTS.get((cfg.get("hf") or {}).get("text_model_type") or "llama", "llama")
    return hf_lm.lm_table(cfg, layout, prefix=_LM, lm_head=_LM_HEAD)


def neva_to_hf_state(state: dict, cfg, vocab_size: int) -> dict[str, torch.Tensor]:
    """`NevaModule.state_dict()` (TP=1) -> canonical HF LLaVA tensors."""
    lm = {k[len(_NEVA_LM):]: v for k, v in state.items() if k.startswith(_NEVA_LM)}
    out = hf_lm.export_lm(lm, lm_table(cfg), vocab_size)
    for ours, theirs in _PROJECTOR_MAP.items():
        out[theirs] = state[ours]
    for key in state:
        if key.startswith(_NEVA_VISION):
            out[_VISION + key[len(_NEVA_VISION):]] = state[key]
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------------------ HF -> .nemo
def _hf_image_processor(input_dir: str, vision_config):
    """The folder's image processor (preprocessor_config.json, or inside processor_config.json)."""
    from transformers import AutoImageProcessor

    from nemo_neva.modules.vision import build_image_processor

    if any(os.path.isfile(os.path.join(input_dir, f)) for f in ("preprocessor_config.json", "processor_config.json")):
        return AutoImageProcessor.from_pretrained(input_dir)
    log.warning("%s has no image processor config: using a default one sized %d", input_dir, vision_config.image_size)
    return build_image_processor(vision_config)


def load_hf_llava_into_neva(input_dir: str, trust_pickle: bool = False, make_vocab_size_divisible_by: int = 128):
    """Build a `MegatronNevaModel` holding the weights of a local HF LLaVA directory."""
    from transformers import AutoConfig

    from nemo_neva import MegatronNevaModel
    if not os.path.isfile(os.path.join(input_dir, "config.json")):
        raise FileNotFoundError(f"{input_dir}: no config.json (expected a LlavaForConditionalGeneration folder)")
    with open(os.path.join(input_dir, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type != "llava":
        raise UnsupportedCheckpoint(f"{input_dir}: model_type {model_type!r}; only 'llava' is supported")
    config = AutoConfig.from_pretrained(input_dir)
    cfg = nemo_config_from_hf(config, input_dir, make_vocab_size_divisible_by)
    image_processor = _hf_image_processor(input_dir, config.vision_config)
    # generation then makes the pixels transformers' processor makes (CLIP's shortest edge + crop: keep)
    cfg.data.image_aspect_ratio = mode_of_hf_processor(image_processor)
    source = open_weights(input_dir, trust_pickle, rename=canonical_key)  # fail on weights before building
    where = f"{input_dir}"
    used = hf_lm.check_sources(source, lm_table(cfg), where, _LM_HEAD)
    rest = {k for k in source.names() if k.startswith(_VISION) or k.startswith(_PROJ)}
    hf_lm.check_leftovers(source, used | rest, where)
    model = MegatronNevaModel(cfg)
    if model.image_token_id != _image_token_id(config):
        raise UnsupportedCheckpoint(f"config image_token_index={_image_token_id(config)} but the tokenizer's "
                                    f"'<image>' token is {model.image_token_id}")
    # Keep the checkpoint's own vision config and image processor (not the ones rebuilt from the cfg).
    model.vision_config = config.vision_config
    model.image_processor = image_processor
    hf_lm.load_lm(model.model.language_model, source, lm_table(cfg), where, lm_head=_LM_HEAD)
    target = {k: v for k, v in model.model.state_dict().items() if not k.startswith(_NEVA_LM)
              and torch.is_tensor(v) and not k.endswith("_extra_state")}
    mapped = {}
    for ours, theirs in _PROJECTOR_MAP.items():
        if theirs in source:
            mapped[ours] = source.read(theirs)
        elif theirs.endswith(".bias"):  # multimodal_projector_bias=False is a zero bias here
            mapped[ours] = torch.zeros_like(target[ours])
        else:
            raise UnsupportedCheckpoint(f"checkpoint has no {theirs}")
    for key in sorted(k for k in source.names() if k.startswith(_VISION)):
        mapped[_NEVA_VISION + key[len(_VISION):]] = source.read(key)
    missing, unexpected = sorted(set(target) - set(mapped)), sorted(set(mapped) - set(target))
    if missing or unexpected:
        raise UnsupportedCheckpoint(f"checkpoint does not match the model: missing={missing[:8]} "
                                    f"unexpected={unexpected[:8]}")
    with torch.no_grad():
        for key, value in mapped.items():
            if tuple(value.shape) != tuple(target[key].shape):
                raise UnsupportedCheckpoint(f"{key}: checkpoint shape {tuple(value.shape)} != model "
                                            f"{tuple(target[key].shape)}")
            target[key].copy_(value.to(target[key].dtype))
    return model


def convert_hf_to_nemo(input_dir: str, output_path: str, trust_pickle: bool = False,
                       make_vocab_size_divisible_by: int = 128) -> str:
    model = load_hf_llava_into_neva(input_dir, trust_pickle, make_vocab_size_divisible_by)
    model.save_to(output_path)
    return output_path


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
    from transformers import LlavaConfig

    config = LlavaConfig(
        vision_config=model.vision_config.to_dict(), text_config=text.to_dict(),
        image_token_index=model.image_token_id, image_seq_length=model.tokens_per_image, projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if drop_cls else "full",
        vision_feature_layer=int(venc.get("vision_select_layer", -2)), multimodal_projector_bias=True,
        tie_word_embeddings=tie,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def export_neva_to_hf(model, output_dir: str, dtype: Optional[str] = None) -> str:
    """Write config.json, model.safetensors, tokenizer and processor files of an HF LLaVA model.

    `dtype` (float32 | bfloat16 | float16): of the written tensors; default: the dtype of the HF checkpoint
    the .nemo was converted from (so a bf16 checkpoint goes back to bf16 bit for bit), else float32.
    """
    from safetensors.torch import save_file
    from transformers import LlavaProcessor

    config, vocab_size, drop_cls = hf_config_from_neva(model)
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
    kind = _VISION_KINDS[model.vision_config.model_type]
    processor = LlavaProcessor(
        # an image processor that makes the model's own pixels (its image_aspect_ratio) by itself
        image_processor=hf_processor_for(model.image_processor, model.image_aspect_ratio),
        tokenizer=model.tokenizer,
        patch_size=model.vision_config.patch_size,
        vision_feature_select_strategy="default" if drop_cls else "full",
        num_additional_image_tokens=1 if kind == "clip" else 0, image_token="<image>",
    )
    processor.save_pretrained(output_dir)
    return output_dir


def export_nemo_to_hf(nemo_path: str, output_dir: str, dtype: Optional[str] = None) -> str:
    """Restore a .nemo (any TP/PP layout: on one process it is resharded to TP=PP=1) and export it."""
    from nemo_neva import MegatronNevaModel

    if not os.path.isfile(nemo_path):
        raise FileNotFoundError(f"{nemo_path}: no such .nemo file")
    model = MegatronNevaModel.restore_from(nemo_path)
    hf_config_from_neva(model)  # refuse before writing anything
    return export_neva_to_hf(model, output_dir, dtype)

