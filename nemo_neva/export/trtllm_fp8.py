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

from typing import Iterable

import torch

from nemo_neva.export.fp8 import FP8_MAX, decoder_linears, record_input_amax, scale_of, to_fp8  # noqa: F401 (FP8_MAX: API)
from nemo_neva.export.fp8 import calibration_batches  # noqa: F401  (the API the TRT-LLM export and tests use)

QUANTIZED = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")


def quantized_prefixes(full: dict) -> list[str]:
    return sorted(name[: -len(".weight")] for name in full
                  if name.endswith(".weight") and name[: -len(".weight")].endswith(QUANTIZED))


def weight_scales(full: dict) -> dict[str, torch.Tensor]:
    """Per-tensor weight scaling factor of every quantized linear (from the full TP=1 tensors)."""
    return {p: scale_of(full[p + ".weight"].abs().amax()).reshape(1) for p in quantized_prefixes(full)}


def quantize_rank(tensors: dict, w_scales: dict, act_amax: dict) -> dict[str, torch.Tensor]:
    """A rank's high-precision tensors -> FP8 weights plus their scaling factors (other tensors unchanged)."""
    out = dict(tensors)
    for prefix, scale in w_scales.items():
        out[prefix + ".weight"] = to_fp8(out[prefix + ".weight"], scale)
        out[prefix + ".weights_scaling_factor"] = scale.clone().float()
        amax = act_amax.get(prefix)
        if amax is None:
            raise ValueError(f"no calibrated activation range for {prefix}")
        out[prefix + ".activation_scaling_factor"] = scale_of(amax).reshape(1)
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
_TRTLLM_NAMES = {"qkv": "attention.qkv", "proj": "attention.dense", "fc1": "mlp.fc", "fc2": "mlp.proj"}


def _linear_inputs(module) -> dict[str, torch.nn.Module]:
    """TensorRT-LLM linear prefix -> the megatron-core module whose *input* is that linear's input."""
    return {f"transformer.layers.{i}.{_TRTLLM_NAMES[kind]}": mod for (i, kind), mod in decoder_linears(module).items()}


def calibrate_activation_amax(model, batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """amax(|input|) of every quantized linear over `batches` (dicts with tokens, position_ids, images; a tiled
    model's also image_sizes); mlp.gate reads mlp.fc's input."""
    amax = record_input_amax(model, _linear_inputs(model.model), batches)
    for name in list(amax):
        if name.endswith("mlp.fc"):
            amax[name[: -len("fc")] + "gate"] = amax[name]
    return amax
