"""Model-FLOPs utilisation (MFU) of a training step: model FLOPs per second / the device's peak FLOP/s.

Model FLOPs come from `nemo_neva.perf.paper_model.flops_per_sample` (matmuls + attention of the LM, frozen
vision tower forward, projector; recomputation not counted, the usual MFU convention). The peak is, in
this order: `model.peak_tflops` from the config; the dense datasheet peak of a known GPU (table below,
matched on the CUDA device name and the training precision); otherwise a measured matmul rate on this
device (CPU runs: there is no datasheet peak for "a CPU"), which is an achievable rate, not a peak, so
MFU on CPU reads high. `peak_source` says which one is in use.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from nemo_neva.perf import paper_model as perf_model

# Dense (no sparsity) peak TFLOP/s per GPU from NVIDIA's datasheets, fp32 = plain FP32 (no TF32). Matched on
# the CUDA device name, most specific first: the H100 comes as SXM ('NVIDIA H100 80GB HBM3'), PCIe ('NVIDIA
# H100 PCIe') and NVL ('NVIDIA H100 NVL'), with different clocks and so different peaks. (Lightning's
# `get_available_flops` tells the H100s apart too, but takes a live device and has no fp8 rows.)
PEAK_TFLOPS = (
    ("H200", {"fp8": 1979.0, "bf16": 989.0, "fp32": 67.0}),
    ("H100 PCIE", {"fp8": 1513.0, "bf16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"fp8": 1671.0, "bf16": 835.0, "fp32": 60.0}),
    ("H100", {"fp8": 1979.0, "bf16": 989.0, "fp32": 67.0}),  # SXM (HBM3)
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
)


def table_peak(device_name: str, precision: str) -> Optional[float]:
    """Peak FLOP/s for a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3') and precision, or None."""
    for key, peaks in PEAK_TFLOPS:
        if key in device_name.upper():
            return peaks[precision] * 1e12 if precision in peaks else None
    return None


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 512, repeats: int = 8) -> float:
    """FLOP/s of an n x n matmul on `device` (best of `repeats`)."""
    g = torch.Generator(device=device).manual_seed(0)  # leave the training RNG streams alone
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def resolve_peak(peak_tflops: Optional[float], precision: str, device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for one device."""
    if peak_tflops:
        return float(peak_tflops) * 1e12, "model.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak(name, precision)
        if peak is not None:
            return peak, f"datasheet {name} {precision}"
    dtype = torch.bfloat16 if precision in ("bf16", "fp8") and device.type == "cuda" else torch.float32
    n = 4096 if device.type == "cuda" else 512
    return measured_matmul_flops(device, dtype, n=n), f"measured {str(dtype).replace('torch.', '')} matmul on {device.type}"


class StepFlops:
    """Model FLOPs of one training step on one device, for a nemo_neva model config."""

    def __init__(self, shape: perf_model.NevaShape, stage: str, tp: int = 1, pp: int = 1):
        self.shape, self.stage, self.model_parallel = shape, stage, tp * pp

    def __call__(self, rows: int, seq_length: int, images: int) -> float:
        """`rows` sequences of `seq_length` tokens and `images` images processed by this data-parallel
        rank; tensor/pipeline-parallel ranks share that work equally."""
        f = perf_model.flops_per_sample(self.shape, perf_model.Layout(seq_length=seq_length, stage=self.stage))
        total = (f["lm_gemm"] + f["lm_attention"]) * rows + (f["vision"] + f["projector"]) * images
        return total / self.model_parallel


def step_flops_for(model) -> StepFlops:
    """StepFlops for a MegatronNevaModel (its config, padded vocabulary and vision config)."""
    from nemo_neva.modules.language_model import padded_vocab_size

    cfg = model.cfg
    vocab = padded_vocab_size(len(model.tokenizer), cfg.get("make_vocab_size_divisible_by", 128), 1)
    shape = perf_model.from_model_cfg(cfg, vocab, model.vision_config)
    stage = "pretrain" if cfg.mm_cfg.llm.get("freeze", False) else "finetune"
    return StepFlops(shape, stage, cfg.get("tensor_model_parallel_size", 1),
                     cfg.get("pipeline_model_parallel_size", 1))


def training_precision(trainer_precision, fp8: Optional[str] = None) -> str:
    """The peak to compare with: fp8 (LM GEMMs through TE), bf16, or fp32."""
    if fp8:
        return "fp8"
    return "bf16" if "bf16" in str(trainer_precision) else "fp32"
