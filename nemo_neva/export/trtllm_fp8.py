"""FP8 (E4M3, per-tensor) quantization of the TensorRT-LLM checkpoint, as TensorRT-LLM's `FP8Linear` reads it.

For every column/row-parallel linear of the decoder (attention.qkv, attention.dense, mlp.fc, mlp.gate,
mlp.proj; lm_head and embeddings stay in the high-precision dtype, TensorRT-LLM's default exclusions):
  <prefix>.weight                     float8_e4m3fn, weight / weights_scaling_factor
  <prefix>.weights_scaling_factor     float32 [1] = amax(|W|) / 448 (over the full, unsplit tensor, so every
                                       TP rank dequantizes with the same factor)
  <prefix>.activation_scaling_factor  float32 [1] = amax(|input|) / 448, measured by running the .nemo model
                                       (fp32, on CPU is fine) over calibration samples
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch

from nemo_neva.export.placement import on_module

log = logging.getLogger(__name__)

FP8_MAX = 448.0  # largest finite float8_e4m3fn
QUANTIZED = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")
_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # keeps an all-zero tensor from dividing by zero


def quantized_prefixes(full: dict) -> list[str]:
    return sorted(name[: -len(".weight")] for name in full
                  if name.endswith(".weight") and name[: -len(".weight")].endswith(QUANTIZED))


def weight_scales(full: dict) -> dict[str, torch.Tensor]:
    """Per-tensor weight scaling factor of every quantized linear (from the full TP=1 tensors)."""
    return {p: (full[p + ".weight"].float().abs().amax() / FP8_MAX).clamp(min=_MIN_SCALE).reshape(1)
            for p in quantized_prefixes(full)}


def quantize_rank(tensors: dict, w_scales: dict, act_amax: dict) -> dict[str, torch.Tensor]:
    """A rank's high-precision tensors -> FP8 weights plus their scaling factors (other tensors unchanged)."""
    out = dict(tensors)
    for prefix, scale in w_scales.items():
        w = out[prefix + ".weight"].float()
        out[prefix + ".weight"] = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous()
        out[prefix + ".weights_scaling_factor"] = scale.clone().float()
        amax = act_amax.get(prefix)
        if amax is None:
            raise ValueError(f"no calibrated activation range for {prefix}")
        out[prefix + ".activation_scaling_factor"] = (amax / FP8_MAX).clamp(min=_MIN_SCALE).reshape(1).float()
    return out


def dequantize(tensors: dict) -> dict[str, torch.Tensor]:
    """FP8 weights back to float32 (weight * weights_scaling_factor); used to check the export."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scaling_factor"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            out[name] = t.float() * tensors[name[: -len("weight")] + "weights_scaling_factor"]
        else:
            out[name] = t.float()
    return out


# ---------------------------------------------------------------------------------------- calibration
def _linear_inputs(module) -> dict[str, torch.nn.Module]:
    """TensorRT-LLM linear prefix -> the megatron-core module whose *input* is that linear's input."""
    found = {}
    for i, layer in enumerate(module.language_model.decoder.layers):
        qkv = layer.self_attention.linear_qkv
        if hasattr(qkv, "layer_norm_weight"):
            raise ValueError("FP8 calibration needs the separate layer norms of the local layer spec; this model "
                             "uses Transformer Engine's fused LayerNorm+Linear (model.transformer_engine=true)")
        t = f"transformer.layers.{i}."
        found[t + "attention.qkv"] = qkv
        found[t + "attention.dense"] = layer.self_attention.linear_proj
        found[t + "mlp.fc"] = layer.mlp.linear_fc1  # fc and gate read the same input
        found[t + "mlp.proj"] = layer.mlp.linear_fc2
    return found


@torch.no_grad()
def calibrate_activation_amax(model, batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """amax(|input|) of every quantized linear over `batches` (dicts with tokens, position_ids, images; a tiled
    model's also image_sizes)."""
    amax: dict[str, torch.Tensor] = {}
    hooks = []

    def record(name):
        def hook(_module, args):
            value = args[0].detach().float().abs().amax()
            amax[name] = torch.maximum(amax[name], value) if name in amax else value
        return hook

    for name, mod in _linear_inputs(model.model).items():
        hooks.append(mod.register_forward_pre_hook(record(name)))
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            # the collator's host tensors on the model's device; pixel values in the vision tower's dtype
            batch = on_module(batch, model.model.vision_tower if model.model.vision_tower is not None
                              else model.model)
            model.model(batch["tokens"], batch["position_ids"], images=batch.get("images"),
                        num_images=batch.get("num_images"), image_sizes=batch.get("image_sizes"),
                        video_frames=batch.get("video_frames"))
            n += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ValueError("FP8 calibration got no usable samples")
    amax = {name: value.cpu() for name, value in amax.items()}  # the weights they scale are on the host
    for name in list(amax):
        if name.endswith("mlp.fc"):
            amax[name[: -len("fc")] + "gate"] = amax[name]
    log.info("FP8 calibration: %d samples", n)
    return amax


def calibration_batches(model, data_path: str, image_folder, num_samples: int):
    """Samples of a LLaVA-format JSON (+ image folder), encoded exactly as training encodes them."""
    from omegaconf import OmegaConf, open_dict

    from nemo_neva.data.collate import NevaCollator

    data_cfg = OmegaConf.create(OmegaConf.to_container(model.cfg.data, resolve=True)) if model.cfg.get("data") \
        else OmegaConf.create({})
    with open_dict(data_cfg):
        data_cfg.data_path = data_path
        data_cfg.image_folder = image_folder
        data_cfg.strict = False
    dataset = model.build_dataset(data_cfg, data_path)
    collate = NevaCollator(pad_id=model.tokenizer.pad_token_id)
    taken = 0
    for idx in range(len(dataset)):
        if taken >= num_samples:
            return
        item = dataset[idx]
        if item is None:
            continue
        taken += 1
        yield collate([item])
