""".nemo -> TensorRT-LLM: the LLM as a TensorRT-LLM checkpoint, the vision tower + projector as ONNX.

Output folder:
  llm/config.json, llm/rank{N}.safetensors   TensorRT-LLM unified checkpoint (trtllm-build --checkpoint_dir llm)
  vision/vision_encoder.onnx                  pixel values [B,3,H,W] -> image features [B, tokens, hidden]
                                              (a tiled model: B tiles -> each tile's features)
  vision/preprocessor_config.json             the HF image processor that makes those pixel values (the model's
                                              `pixel_processor`: for a tiled model LlavaNextImageProcessor with
                                              the model's grid pinpoints)
  vision/image_newline.safetensors            tiled models only: the learned row-end embedding `image_newline`
  tokenizer/                                  the HF tokenizer
  nemo_neva_export.json                       image token id, tokens per image, vocab size, prompt template,
                                              stop markers: what a runtime needs to build the prompt table;
                                              image_aspect_ratio (+ pad colour): how pixel values are made
                                              from an image with vision/'s processor, as in training
                                              (`export_pixels` / nemo_neva.data.image_io.preprocess);
                                              `image_tiling` (tiled models): grid_pinpoints, tile, side, max_tiles,
                                              the newline's path: how a request's tiles become its prompt table
                                              (nemo_neva.export.trtllm_prompt.tiled_prompt_table), where an image
                                              takes `Tiling.tokens(h, w)` rows (`tokens_per_image` is null) and
                                              `max_tokens_per_image` sizes the engine's table
  engines/llm, engines/vision.engine          only with --build, where TensorRT-LLM / TensorRT are installed
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch
from safetensors.torch import save_file

from nemo_neva.export import trtllm_fp8 as fp8
from nemo_neva.export.hf import UnsupportedCheckpoint
from nemo_neva.export.onnx_vision import INPUT, OUTPUT, export_vision_onnx
from nemo_neva.export.trtllm_layout import DTYPES, neva_to_trtllm, split_for_rank, trtllm_config
from nemo_neva.export.trtllm_prompt import NEWLINE_KEY, export_tiling

log = logging.getLogger(__name__)

LLM_DIR, VISION_DIR, TOKENIZER_DIR = "llm", "vision", "tokenizer"
VISION_ONNX = "vision_encoder.onnx"
NEWLINE_FILE = "image_newline.safetensors"
META_FILE = "nemo_neva_export.json"


def export_vocab_size(model) -> int:
    """Real vocabulary (not megatron's padded one): ids from here up address the prompt table."""
    return int((model.cfg.get("hf") or {}).get("vocab_size") or len(model.tokenizer))


def _prompt_meta(model) -> dict:
    from nemo_neva.data.constants import IMAGE_TOKEN
    from nemo_neva.inference.prompting import build_prompt, stop_markers

    template = (model.cfg.get("data") or {}).get("conv_template", "plain")
    ids, strings = stop_markers(model.tokenizer, template)
    return {"conv_template": template,
            "prompt_example": build_prompt(template, "{question}", has_image=True),
            "image_tag": IMAGE_TOKEN, "stop_token_ids": sorted(int(i) for i in ids), "stop_strings": strings}


def _image_meta(model) -> dict:
    """How a consumer turns an image into the vision input: the model's own preprocessing
    (nemo_neva.data.image_io.preprocess with vision/'s processor and this aspect-ratio mode)."""
    from nemo_neva.data.image_io import pad_colour, target_size

    return {"image_aspect_ratio": model.image_aspect_ratio,
            "image_pad_colour": list(pad_colour(model.image_processor)),
            "image_input_size": list(target_size(model.image_processor))}


def _tiling_meta(model, vision_dir: str) -> dict:
    """Tiled models: the geometry a runtime packs tile features with, and the newline written beside the ONNX."""
    tiling = getattr(model, "tiling", None)
    if tiling is None:
        return {"tokens_per_image": int(model.tokens_per_image), "max_tokens_per_image": int(model.tokens_per_image),
                "image_tiling": None}
    newline = model.model.image_newline.detach().float().contiguous()
    save_file({NEWLINE_KEY: newline}, os.path.join(vision_dir, NEWLINE_FILE), metadata={"format": "pt"})
    return {"tokens_per_image": None,  # by image size: Tiling.tokens(h, w)
            "max_tokens_per_image": tiling.max_tokens,
            "image_tiling": {"grid_pinpoints": [list(p) for p in tiling.pinpoints], "tile": tiling.tile,
                             "side": tiling.side, "tokens_per_tile": tiling.base_tokens, "max_tiles": tiling.max_tiles,
                             "image_newline": f"{VISION_DIR}/{NEWLINE_FILE}"}}


def export_pixels(export_dir: str, image, meta: Optional[dict] = None) -> torch.Tensor:
    """Pixel values [1,3,H,W] for a PIL image, from the export folder alone (its processor + recorded
    aspect-ratio mode): what the .nemo model's `preprocess_images` gives, i.e. what it was trained on.
    A tiled export gives [1, max_tiles, 3, tile, tile] (`anyres.image_tiles` keeps the image's own)."""
    from transformers import AutoImageProcessor

    from nemo_neva.data.image_io import preprocess

    if meta is None:
        with open(os.path.join(export_dir, META_FILE)) as f:
            meta = json.load(f)
    if "image_aspect_ratio" not in meta:
        raise ValueError(f"{export_dir}: {META_FILE} does not record image_aspect_ratio (an export from before it "
                         "was recorded); export the .nemo again")
    processor = AutoImageProcessor.from_pretrained(os.path.join(export_dir, meta["image_processor"]))
    return preprocess(image, processor, meta["image_aspect_ratio"], export_tiling(meta)).unsqueeze(0)


def write_llm_checkpoint(model, llm_dir: str, tp_size: int = 1, dtype: str = "bfloat16",
                         act_amax: Optional[dict] = None) -> dict:
    """config.json + rank{N}.safetensors; FP8 (per-tensor E4M3) when calibrated `act_amax` is given."""
    from megatron.core import parallel_state

    ps = parallel_state
    if ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("export from a model restored on one process (TP=PP=1); the .nemo reshards on restore")
    cfg = model.cfg
    vocab = export_vocab_size(model)
    config = trtllm_config(cfg, vocab, dtype, tp_size, quant_algo="FP8" if act_amax is not None else None)
    state = {k: v for k, v in model.model.state_dict().items()
             if torch.is_tensor(v) and k.startswith("language_model.")}
    full = neva_to_trtllm(state, cfg, vocab)
    w_scales = fp8.weight_scales(full) if act_amax is not None else None
    os.makedirs(llm_dir, exist_ok=True)
    with open(os.path.join(llm_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for rank in range(tp_size):
        tensors = split_for_rank(full, config, rank)
        if w_scales is not None:  # quantize from fp32, before the cast to the checkpoint dtype
            tensors = fp8.quantize_rank(tensors, w_scales, act_amax)
        tensors = {k: (v if v.dtype == torch.float8_e4m3fn or k.endswith("_scaling_factor")
                       else v.to(DTYPES[dtype])).contiguous() for k, v in tensors.items()}
        save_file(tensors, os.path.join(llm_dir, f"rank{rank}.safetensors"), metadata={"format": "pt"})
    return config


def export_neva_to_trtllm(model, output_dir: str, tp_size: int = 1, dtype: str = "bfloat16", fp8_calib=None,
                          calib_samples: int = 16) -> dict:
    """Write the whole export folder; `fp8_calib` = (data_path, image_folder) turns on FP8. Returns the meta."""
    if dtype not in DTYPES:
        raise UnsupportedCheckpoint(f"dtype {dtype!r}; supported: {sorted(DTYPES)}")
    trtllm_config(model.cfg, export_vocab_size(model), dtype, tp_size)  # refuse before any work
    if getattr(model, "frame_pool", None) is not None:
        log.warning("model.mm_cfg.video.pool: the TensorRT-LLM export takes images only (its vision engine does not "
                    "pool); video frames sent to it as images would cost and get an image's unpooled tokens")
    act_amax = None
    if fp8_calib is not None:
        data_path, image_folder = fp8_calib
        act_amax = fp8.calibrate_activation_amax(
            model, fp8.calibration_batches(model, data_path, image_folder, calib_samples))
    config = write_llm_checkpoint(model, os.path.join(output_dir, LLM_DIR), tp_size, dtype, act_amax)
    vision_dir = os.path.join(output_dir, VISION_DIR)
    export_vision_onnx(model, os.path.join(vision_dir, VISION_ONNX))
    model.processor.pixel_processor.save_pretrained(vision_dir)
    model.tokenizer.save_pretrained(os.path.join(output_dir, TOKENIZER_DIR))
    meta = {
        "format_version": 1,
        "image_token_id": int(model.image_token_id),
        **_tiling_meta(model, vision_dir),
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "image_size": int(model.vision_config.image_size),
        "llm_checkpoint": LLM_DIR, "architecture": config["architecture"], "dtype": dtype, "tp_size": tp_size,
        "quantization": config["quantization"],
        "vision_onnx": f"{VISION_DIR}/{VISION_ONNX}", "vision_input": INPUT, "vision_output": OUTPUT,
        "image_processor": VISION_DIR, "tokenizer": TOKENIZER_DIR,
        **_image_meta(model),
        **_prompt_meta(model),
    }
    if act_amax is not None:
        meta["fp8_calibration"] = {"data_path": fp8_calib[0], "samples": calib_samples}
    with open(os.path.join(output_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def default_calib_data(model) -> tuple[Optional[str], Optional[str]]:
    """The training data recorded in the .nemo config, when it still exists on this machine."""
    from nemo_neva.cli import resolve_path

    data = model.cfg.get("data") or {}
    path = data.get("data_path")
    if isinstance(path, str) and os.path.isfile(resolve_path(path) or ""):
        return resolve_path(path), resolve_path(data.get("image_folder"))
    return None, None


def export_nemo_to_trtllm(nemo_path: str, output_dir: str, tp_size: int = 1, dtype: str = "bfloat16",
                          fp8_enabled: bool = False, calib_data: Optional[str] = None,
                          calib_image_folder: Optional[str] = None, calib_samples: int = 16) -> dict:
    from nemo_neva import MegatronNevaModel

    if not os.path.isfile(nemo_path):
        raise FileNotFoundError(f"{nemo_path}: no such .nemo file")
    # Refuse an unsupported LM, TP size or dtype before paying for the restore.
    trtllm_config(MegatronNevaModel.restore_from(nemo_path, return_config=True), 1, dtype, tp_size)
    if fp8_enabled and calib_data is not None and not os.path.exists(calib_data):
        raise FileNotFoundError(f"--calib-data {calib_data}: no such file")
    model = MegatronNevaModel.restore_from(nemo_path)
    calib = None
    if fp8_enabled:
        if calib_data is None:
            calib_data, default_folder = default_calib_data(model)
            calib_image_folder = calib_image_folder or default_folder
        if calib_data is None:
            raise ValueError("--fp8 needs calibration samples for the activation scaling factors: pass "
                             "--calib-data LLAVA.json [--calib-image-folder DIR] (the .nemo's training data "
                             "path does not exist here)")
        calib = (calib_data, calib_image_folder)
    return export_neva_to_trtllm(model, output_dir, tp_size, dtype, calib, calib_samples)
