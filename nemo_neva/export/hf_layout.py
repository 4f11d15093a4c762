"""Hugging Face LLaVA <-> NeVA: the tensor names, the config checks and the config mapping both directions share
(`hf_import.py` reads a HF folder into a model, `hf.py` writes one; the module docstring of `hf.py` has the map)."""
from __future__ import annotations

import os
import re

import torch
from omegaconf import DictConfig, OmegaConf

from nemo_neva.pretrained import hf_lm
from nemo_neva.pretrained.lm_config import lm_keys_from_hf
from nemo_neva.pretrained.weights import UnsupportedCheckpoint, open_weights, read_all

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
    (re.compile(r"^model\.image_newline$"), "image_newline"),
]
_NEWLINE = "image_newline"  # LLaVA-NeXT's row-end embedding: the same name on both sides
_NEXT = "llava_next"
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
    if getattr(config, "model_type", None) not in ("llava", _NEXT):
        raise UnsupportedCheckpoint(f"model_type {getattr(config, 'model_type', None)!r}: only 'llava' "
                                    "(LlavaForConditionalGeneration) and 'llava_next' "
                                    "(LlavaNextForConditionalGeneration) checkpoints are supported")
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
    if config.model_type == _NEXT:
        _check_next(config)


def _check_next(config) -> None:
    """LLaVA-NeXT: tiles of the tower's size, a square feature grid per tile (CLIP's CLS dropped)."""
    from nemo_neva.modules.tiling import check_pinpoints

    if config.vision_feature_select_strategy == "full" and _VISION_KINDS[config.vision_config.model_type] == "clip":
        raise UnsupportedCheckpoint("LLaVA-NeXT with a CLIP tower and vision_feature_select_strategy='full' keeps the "
                                    "CLS token, so a tile's features are no square grid (transformers cannot unpad "
                                    "them either); only 'default' is supported")
    try:
        check_pinpoints(config.image_grid_pinpoints, int(config.vision_config.image_size))
    except ValueError as err:
        raise UnsupportedCheckpoint(f"image_grid_pinpoints: {err}") from err


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
            # LLaVA-NeXT: anyres tiling with the checkpoint's grids (its image_newline comes with the weights)
            **({"image_tiling": {"enabled": True, "grid_pinpoints": [list(map(int, p)) for p in
                                                                     config.image_grid_pinpoints]}}
               if config.model_type == _NEXT else {}),
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
    """The LM tensor table of a NeVA config, under LLaVA's keys (the HF layout of the family it is written in)."""
    from nemo_neva.export.hf_text import export_family

    return hf_lm.lm_table(cfg, hf_lm.LAYOUTS[export_family(cfg)], prefix=_LM, lm_head=_LM_HEAD)


_HUB_VISION = "vision_tower.vision_model."
_HUB_GPT2_LM = "language_model."


def hub_key(key: str, family: str) -> str:
    """Canonical key -> the Hub layout the engines load (llava-hf/llava-1.5-7b-hf): the vision tower under
    `vision_model.`; a GPT-2 LM's base-model tensors straight under `language_model.` (transformers maps that
    prefix onto its `model.language_model`, vLLM's GPT-2 onto its `transformer.`; neither takes the other's)."""
    if key.startswith(_VISION):
        return _HUB_VISION + key[len(_VISION):]
    if family == "gpt2" and key.startswith(_LM):
        return _HUB_GPT2_LM + key[len(_LM):]
    return key


def neva_to_hf_state(state: dict, cfg, vocab_size: int) -> dict[str, torch.Tensor]:
    """`NevaModule.state_dict()` (TP=1) -> canonical HF LLaVA tensors."""
    lm = {k[len(_NEVA_LM):]: v for k, v in state.items() if k.startswith(_NEVA_LM)}
    out = hf_lm.export_lm(lm, lm_table(cfg), vocab_size)
    for ours, theirs in _PROJECTOR_MAP.items():
        out[theirs] = state[ours]
    if _NEWLINE in state:
        out[_NEWLINE] = state[_NEWLINE]
    for key in state:
        if key.startswith(_NEVA_VISION):
            out[_VISION + key[len(_NEVA_VISION):]] = state[key]
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in out.items()}
