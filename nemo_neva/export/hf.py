"""Checkpoint interchange between Hugging Face `LlavaForConditionalGeneration` (and
`LlavaNextForConditionalGeneration`: anyres tiling, `image_grid_pinpoints`, `image_newline`) and a NeVA `.nemo`.

Import (`hf_import.py`): a CLIP or SigLIP vision tower, the LLaVA-1.5 projector (`linear_1` -> GELU -> `linear_2`,
our `mlp2x_gelu`) and a LLaMA-family language model (llama / mistral without a sliding window).

Export (here): the folder the serving engines load as it is (TensorRT-LLM's PyTorch backend, vLLM, SGLang), in the
Hub layout of llava-hf checkpoints: `language_model.model.*` / `language_model.lm_head.weight` (a GPT-2 LM:
`language_model.wte.weight`, `language_model.h.*`: the names both transformers and vLLM map onto their GPT-2),
`vision_tower.vision_model.*`, `multi_modal_projector.*`, `image_newline`. The language model is written in its own
family: the one `model.mm_cfg.llm.from_pretrained` imported it from (llama incl. RoPE scaling, mistral, qwen2,
nemotron, gpt2), or for NeVA's own LM the family that computes it exactly (hf_text.py). With it: the chat template
of the model's conversation template and the stop ids (hf_chat.py), the tokenizer, the image processor.

The LM tensors go through the causal-LM tables of `nemo_neva.pretrained.hf_lm` (the same code that loads
`model.mm_cfg.llm.from_pretrained`):
  q/k/v_proj          -> `linear_qkv`: rows grouped per query group as [q heads of the group, k, v]
  gate_proj, up_proj  -> `linear_fc1`: [gate; up] (SwiGLU)
  embed_tokens/lm_head-> `word_embeddings`/`output_layer`: padded with zero rows to a multiple of
                         `make_vocab_size_divisible_by`; the padding is dropped again on export
Everything else is a rename. Weights are read lazily from safetensors; a pickle `.bin` checkpoint is only
read when the caller says it trusts it.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from typing import Optional

import torch

from nemo_neva.export.hf_import import convert_hf_to_nemo, load_hf_llava_into_neva  # noqa: F401  (the API)
from nemo_neva.export.hf_layout import (  # noqa: F401  (the API, and what the TRT-LLM export reads)
    _EXPORT_DTYPES, _VISION_KINDS, LLAMA_FAMILY, _layer_norm_keys, canonical_key, check_hf_config, hub_key,
    lm_table, neva_to_hf_state, nemo_config_from_hf, read_hf_weights)
from nemo_neva.export.hf_chat import chat_template, stop_token_ids
from nemo_neva.export.hf_engines import check_engine
from nemo_neva.export.hf_fp8 import check_fp8_exportable, fp8_tensors, write_quant_config
from nemo_neva.export.hf_text import export_family, text_config
from nemo_neva.pretrained.hf_lm import pack_qkv, unpack_qkv  # noqa: F401  (also used by the TRT-LLM export)
from nemo_neva.pretrained.weights import UnsupportedCheckpoint


# ------------------------------------------------------------------------------------------ .nemo -> HF
def hf_config_from_neva(model):
    """(LlavaConfig, HF vocab size, drop_cls) equivalent to a MegatronNevaModel; raises naming what is not
    expressible (the LM: see hf_text.py; the projector; the vision tower; unmerged LoRA; video pooling)."""
    cfg = model.cfg
    problems = []
    try:
        export_family(cfg)
    except UnsupportedCheckpoint as err:
        problems.append(str(err).replace("this model cannot be written as HF LLaVA: ", ""))
    if (cfg.get("peft") or {}).get("peft_scheme"):
        problems.append("the model has unmerged LoRA adapters (merge them first: scripts/merge_lora.py)")
    adapter = cfg.mm_cfg.mm_mlp_adapter_type
    if adapter != "mlp2x_gelu":
        problems.append(f"projector mm_mlp_adapter_type={adapter!r} (HF LLaVA's projector is "
                        f"linear_1 -> GELU -> linear_2, i.e. mlp2x_gelu)")
    if getattr(model, "frame_pool", None) is not None:
        problems.append(f"model.mm_cfg.video.pool={cfg.mm_cfg.video.pool!r} (HF LLaVA has no video frame pooling: "
                        "its answers on videos would differ)")
    if problems:
        raise UnsupportedCheckpoint("this model cannot be written as HF LLaVA: " + "; ".join(problems))
    vision = model.vision_config
    kind = _VISION_KINDS.get(vision.model_type)
    if kind is None:
        raise UnsupportedCheckpoint(f"vision tower {vision.model_type!r}: only CLIP / SigLIP")
    venc = cfg.mm_cfg.vision_encoder
    drop_cls = venc.get("drop_cls", True) and kind == "clip"
    vocab_size = int((cfg.get("hf") or {}).get("vocab_size") or len(model.tokenizer))
    tie = bool(cfg.get("share_embeddings_and_output_weights", False))
    text = text_config(cfg, model.tokenizer, vocab_size)
    if tie and export_family(cfg) == "gpt2":
        # transformers' LLaVA ties lm_head to `embed_tokens`, which GPT-2 has not (it has `wte`): the head is
        # written as its own tensor (the same values) and the config says untied
        tie = text.tie_word_embeddings = False
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


def _processor(model, drop_cls: bool, tokenizer):
    """The model's NevaProcessor as transformers' LlavaProcessor (LlavaNextProcessor for a tiled model): it makes
    the model's own pixels by itself (its image_aspect_ratio, or its tiles) and inserts its placeholder counts."""
    kind = _VISION_KINDS[model.vision_config.model_type]
    return model.processor.to_hf(model.vision_config.patch_size, drop_cls,
                                 num_additional_image_tokens=1 if kind == "clip" else 0, tokenizer=tokenizer)


def export_neva_to_hf(model, output_dir: str, dtype: Optional[str] = None, engine: Optional[str] = None,
                      fp8_amax: Optional[dict] = None) -> str:
    """Write an HF LLaVA folder (LLaVA-NeXT for a model with `model.mm_cfg.image_tiling`) in the Hub layout the
    engines load (as llava-hf/llava-1.5-7b-hf): config.json, model.safetensors, generation_config.json (the stop
    ids), tokenizer and processor files, and a chat template rendering the model's `data.conv_template`.

    `dtype` (float32 | bfloat16 | float16): of the written tensors; default: the dtype of the HF checkpoint
    the .nemo was converted from (so a bf16 checkpoint goes back to bf16 bit for bit), else float32.
    `engine` (vllm | trtllm): also refuse what that engine's LLaVA cannot serve (hf_engines.py).
    `fp8_amax`: calibrated LM linear input ranges (hf_fp8.calibrate): write those linears in FP8, ModelOpt's
    format (hf_fp8.py); use `export_neva_to_hf_fp8`, which calibrates.
    Everything is written into a temporary folder beside `output_dir` and renamed at the end, so a refusal or a
    failure leaves no half-written folder; `output_dir` must not exist or be empty.
    """
    from safetensors.torch import save_file

    config, vocab_size, drop_cls = hf_config_from_neva(model)
    if engine is not None:
        check_engine(engine, config)
    dtype = dtype or (model.cfg.get("hf") or {}).get("dtype") or "float32"
    if dtype not in _EXPORT_DTYPES:
        raise UnsupportedCheckpoint(f"export dtype {dtype!r}; supported: {sorted(_EXPORT_DTYPES)}")
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise FileExistsError(f"{output_dir} exists and is not an empty folder; export into a new one")
    config.dtype = dtype
    family = export_family(model.cfg)
    state = {k: v for k, v in model.model.state_dict().items()
             if torch.is_tensor(v) and not k.endswith("_extra_state")}
    hub = {hub_key(k, family): v for k, v in neva_to_hf_state(state, model.cfg, vocab_size).items()}
    tensors = {k: v.to(_EXPORT_DTYPES[dtype]) for k, v in hub.items()}
    if fp8_amax is not None:
        tensors.update(fp8_tensors(hub, fp8_amax))  # quantized from the unrounded weights
    if family == "gpt2" and "language_model.lm_head.weight" not in tensors:  # tied: see hf_config_from_neva
        tensors["language_model.lm_head.weight"] = tensors["language_model.wte.weight"].clone()
    template = (model.cfg.get("data") or {}).get("conv_template") or "plain"
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    try:
        config.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tok = model.tokenizer
        _generation_config(tok, template).save_pretrained(tmp)
        processor = _processor(model, drop_cls, copy.deepcopy(tok))
        jinja = chat_template(template)
        if jinja is not None:
            processor.tokenizer.chat_template = jinja
            processor.chat_template = jinja
        processor.save_pretrained(tmp)
        if fp8_amax is not None:
            write_quant_config(tmp)
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)  # empty (checked above)
        os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def _generation_config(tokenizer, template: str):
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer, template)
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=stops[0] if len(stops) == 1 else stops)


def export_nemo_to_hf(nemo_path: str, output_dir: str, dtype: Optional[str] = None,
                      engine: Optional[str] = None) -> str:
    """Restore a .nemo (any TP/PP layout: on one process it is resharded to TP=PP=1) and export it."""
    from nemo_neva import MegatronNevaModel

    if not os.path.isfile(nemo_path):
        raise FileNotFoundError(f"{nemo_path}: no such .nemo file")
    model = MegatronNevaModel.restore_from(nemo_path)
    return export_neva_to_hf(model, output_dir, dtype, engine)  # refuses before writing anything


def export_neva_to_hf_fp8(model, output_dir: str, calib_data: str, calib_images: Optional[str] = None,
                          calib_samples: int = 16, dtype: Optional[str] = None, engine: Optional[str] = None) -> str:
    """The export with the LM's linears in FP8 (hf_fp8.py), activation scales calibrated on `calib_samples`
    samples of the LLaVA-format JSON `calib_data` (images under `calib_images`). Unquantized tensors: `dtype`,
    default bfloat16. Refuses (writing nothing) before calibrating what FP8 or HF cannot express."""
    from nemo_neva.export.fp8 import calibration_batches
    from nemo_neva.export.hf_fp8 import calibrate

    dtype = dtype or "bfloat16"
    config, _, _ = hf_config_from_neva(model)  # the LM / projector / tower refusals first
    if engine is not None:
        check_engine(engine, config)
    check_fp8_exportable(model, export_family(model.cfg), dtype)
    if not calib_data or not os.path.isfile(calib_data):
        raise FileNotFoundError(f"FP8 calibration data {calib_data!r}: no such LLaVA-format JSON file")
    if calib_images is not None and not os.path.isdir(calib_images):
        raise FileNotFoundError(f"FP8 calibration images {calib_images!r}: no such folder")
    out = os.path.abspath(output_dir)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} exists and is not an empty folder; export into a new one")
    amax = calibrate(model, calibration_batches(model, calib_data, calib_images, calib_samples))
    return export_neva_to_hf(model, output_dir, dtype, engine, fp8_amax=amax)


def export_nemo_to_hf_fp8(nemo_path: str, output_dir: str, calib_data: str, calib_images: Optional[str] = None,
                          calib_samples: int = 16, dtype: Optional[str] = None,
                          engine: Optional[str] = None) -> str:
    """Restore a .nemo and write its FP8 export (export_neva_to_hf_fp8)."""
    from nemo_neva import MegatronNevaModel

    if not os.path.isfile(nemo_path):
        raise FileNotFoundError(f"{nemo_path}: no such .nemo file")
    if not calib_data or not os.path.isfile(calib_data):  # before the (slow) restore
        raise FileNotFoundError(f"FP8 calibration data {calib_data!r}: no such LLaVA-format JSON file")
    model = MegatronNevaModel.restore_from(nemo_path)
    return export_neva_to_hf_fp8(model, output_dir, calib_data, calib_images, calib_samples, dtype, engine)
