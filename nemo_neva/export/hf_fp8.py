"""FP8 (E4M3, per-tensor, static activation scales) Hugging Face LLaVA folder in NVIDIA ModelOpt's format, the
one TensorRT-LLM's PyTorch backend and vLLM (`quant_method: modelopt`, `ModelOptFp8Config`) read.

What the folder holds beside the ordinary export (hf.py):
  hf_quant_config.json   {"producer": {"name": "modelopt", "version": ...},
                          "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": null,
                                           "exclude_modules": [...]}}
  config.json            "quantization_config": the same, in the form ModelOpt writes into config.json
                         (quant_method "modelopt", quant_algo, config_groups, ignore, producer)
  every quantized linear <prefix>.weight        float8_e4m3fn [out, in] = weight / weight_scale
                         <prefix>.weight_scale  float32 scalar = amax(|weight|) / 448
                         <prefix>.input_scale   float32 scalar = amax(|input|) / 448, calibrated
Quantized: the LM decoder's q/k/v/o_proj and gate/up/down_proj (llama, mistral, qwen2, nemotron families).
Excluded, as the engines expect: vision tower, projector, lm_head (`exclude_modules`); embeddings and norms are no
linears and stay in the export dtype (bfloat16 by default: the engines' FP8 linears take bf16/fp16 activations).

Matched against: nvidia-modelopt 0.37.0 (wheel inspected, not installed): `export/quant_utils.py` (the
hf_quant_config dict: producer, quantization.quant_algo / kv_cache_quant_algo / exclude_modules; "lm_head"
appended to exclude_modules), `export/convert_hf_config.py` (config.json's quantization_config),
`export/unified_export_hf.py` (weight_scale / input_scale names beside the weight); vLLM's
`model_executor/layers/quantization/modelopt.py` (`ModelOptFp8Config`: reads hf_quant_config.json's
"quantization.quant_algo" == "FP8"; `ModelOptFp8LinearMethod`: float8_e4m3fn [out, in] weight, per-tensor float32
weight_scale and input_scale, q/k/v (gate/up) scales fused by taking their max and requantizing) and
`model_executor/parameter.py` (`PerTensorScaleParameter` loads a 0-dim scale as well as a [1] one).
ModelOpt itself is not used: it quantizes a transformers model (mtq.quantize, then export_hf_checkpoint); its
FP8 fake-quant has an eager CPU path, so it may run on CPU, but it is no dependency of this project. The scales
here come from our own calibration (export/fp8.py: forward pre-hooks on the megatron-core linears of the .nemo
model over the user's samples), the same rule ModelOpt's FP8 "max" calibration applies (amax / 448).
Verified on CPU only (dequantised weights and logits, tests/export/test_hf_fp8.py); no engine ran this folder here.
"""
from __future__ import annotations

import json
import os
import re

import torch

from nemo_neva.export.fp8 import FP8_MAX, decoder_linears, record_input_amax, scale_of, to_fp8  # noqa: F401
from nemo_neva.pretrained.weights import UnsupportedCheckpoint

FP8_FAMILIES = ("llama", "mistral", "qwen2", "nemotron")  # their HF linears are nn.Linear [out, in]
FP8_DIM_MULTIPLE = 16  # FP8 GEMMs (cuBLASLt / CUTLASS, torch._scaled_mm) need both GEMM dims divisible by 16
EXCLUDE_MODULES = ["lm_head", "language_model.lm_head", "multi_modal_projector*", "vision_tower*"]
_LINEAR = re.compile(r"^language_model\.model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
                     r"\.weight$")
_KIND = {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv", "self_attn.o_proj": "proj",
         "mlp.gate_proj": "fc1", "mlp.up_proj": "fc1", "mlp.down_proj": "fc2"}


def check_fp8_exportable(model, family: str, dtype: str) -> None:
    """Refuse (one line) what the engines' FP8 linears cannot take, before anything is calibrated or written."""
    cfg = model.cfg
    problems = []
    if family not in FP8_FAMILIES:
        problems.append(f"the LM is written as HF {family!r}; FP8 export supports {', '.join(FP8_FAMILIES)}")
    heads = cfg.num_attention_heads
    kv_channels = cfg.get("kv_channels") or cfg.hidden_size // heads
    dims = {"hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.ffn_hidden_size,
            "num_attention_heads * kv_channels": heads * kv_channels,
            "num_query_groups * kv_channels": (cfg.get("num_query_groups") or heads) * kv_channels}
    if dtype == "float32":
        problems.append("--dtype float32 (the engines' FP8 linears take bfloat16 / float16 activations)")
    bad_dims = [f"{name}={value}" for name, value in dims.items() if value % FP8_DIM_MULTIPLE]
    if bad_dims:
        problems.append(", ".join(bad_dims) + f" (FP8 GEMMs need every LM linear dim divisible by {FP8_DIM_MULTIPLE})")
    if problems:
        raise UnsupportedCheckpoint("this model cannot be exported as FP8: " + "; ".join(problems))


def calibrate(model, batches) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, kind) -> amax(|input|) of the LM's linears over `batches` (collated calibration samples)."""
    return record_input_amax(model, decoder_linears(model.model), batches)


def fp8_tensors(hub: dict, act_amax: dict) -> dict[str, torch.Tensor]:
    """Hub-layout high-precision tensors -> FP8 weight, weight_scale, input_scale of every quantized linear
    (from the unrounded values; the caller writes everything else in the export dtype)."""
    out = {}
    for key, weight in hub.items():
        match = _LINEAR.match(key)
        if match is None:
            continue
        layer, name = int(match.group(1)), match.group(2)
        amax = act_amax.get((layer, _KIND[name]))
        if amax is None:
            raise ValueError(f"no calibrated activation range for {key}")
        prefix = key[: -len(".weight")]
        w_scale = scale_of(weight.abs().amax())
        out[key] = to_fp8(weight, w_scale)
        out[prefix + ".weight_scale"] = w_scale.reshape(())
        out[prefix + ".input_scale"] = scale_of(amax).reshape(())
    if not out:
        raise ValueError("no LM linear found to quantize (FP8 export)")
    return out


def hf_quant_config() -> dict:
    from nemo_neva import __version__

    # producer name "modelopt": the engines pick their reader by it; the version says who really wrote it
    return {"producer": {"name": "modelopt", "version": f"nemo-neva-{__version__}"},
            "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": EXCLUDE_MODULES}}


def config_json_quantization(quant: dict) -> dict:
    """hf_quant_config -> the `quantization_config` ModelOpt writes into config.json."""
    q = quant["quantization"]
    static_fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
    return {"config_groups": {"group_0": {"input_activations": static_fp8, "weights": static_fp8,
                                          "targets": ["Linear"]}},
            "ignore": list(q["exclude_modules"]), "quant_algo": q["quant_algo"], "producer": quant["producer"],
            "quant_method": "modelopt"}


def write_quant_config(folder: str) -> None:
    """hf_quant_config.json, and quantization_config into the folder's config.json."""
    quant = hf_quant_config()
    with open(os.path.join(folder, "hf_quant_config.json"), "w") as f:
        json.dump(quant, f, indent=2)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["quantization_config"] = config_json_quantization(quant)
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
