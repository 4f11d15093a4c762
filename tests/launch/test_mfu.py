"""MFU arithmetic: the FLOPs of a step, the peak it is divided by, and the logged value of a real step."""
import torch

from nemo_neva.perf import mfu
from nemo_neva.perf import paper_model as perf_model


def _tiny_shape(gated=False):
    lm = perf_model.LMShape(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2, vocab_size=32,
                            position_embedding_type="rope", normalization="RMSNorm", gated=gated, bias=False)
    vision = perf_model.VisionShape(hidden_size=4, intermediate_size=8, num_layers=1, num_heads=1, image_size=8,
                                    patch_size=4)
    return perf_model.NevaShape(lm=lm, vision=vision, projector="linear")


def test_step_flops_by_hand():
    shape = _tiny_shape()
    s, rows, images = 10, 3, 2
    # LM per layer: qkv 8x24, proj 8x8, fc1 8x16, fc2 16x8 = 192+64+128+128 = 512 weights; 2 layers + output 32x8
    lm_weights = 2 * 512 + 32 * 8
    attn_fwd = 4 * s * s * 8 * 2  # QK^T and AV, per layer
    # vision (CLIP, 4 patches + CLS = 5 positions): 1 layer of 4*d^2 + 2*d*i = 64 + 64, patch conv 3*16*4
    vis_fwd = 2 * (64 + 64 + 3 * 16 * 4) * 5 + 4 * 5 * 5 * 4 * 1
    proj = 6 * (4 * 8 + 8) * 4  # fwd+bwd of a 4->8 linear (with bias) over 4 image tokens
    finetune = (3 * 2 * lm_weights * s + 3 * attn_fwd) * rows + (vis_fwd + proj) * images
    pretrain = (2 * 2 * lm_weights * s + 3 * attn_fwd) * rows + (vis_fwd + proj) * images  # no LM weight grads
    assert mfu.StepFlops(shape, "finetune")(rows, s, images) == finetune
    assert mfu.StepFlops(shape, "pretrain")(rows, s, images) == pretrain
    # tensor x pipeline parallel ranks share the same work
    assert mfu.StepFlops(shape, "finetune", tp=2, pp=2)(rows, s, images) == finetune / 4


def test_peak_sources():
    assert mfu.table_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert mfu.table_peak("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert mfu.table_peak("NVIDIA A100-SXM4-80GB", "fp8") is None  # no FP8 on Ampere
    assert mfu.table_peak("Tesla T4", "bf16") is None
    assert mfu.resolve_peak(123.0, "bf16", torch.device("cpu")) == (123e12, "model.peak_tflops")
    peak, source = mfu.resolve_peak(None, "fp32", torch.device("cpu"))
    assert source.startswith("measured") and 1e6 < peak < 1e14
    assert mfu.training_precision("bf16-mixed") == "bf16" and mfu.training_precision("32-true") == "fp32"
    assert mfu.training_precision("bf16-mixed", fp8="hybrid") == "fp8"


def test_h100_peak_by_variant():
    """The H100 variants' names (as torch.cuda.get_device_name reports them) get their own datasheet peaks: a
    PCIe card is not an SXM one (an SXM peak on a PCIe card would understate its MFU by a quarter)."""
    assert mfu.table_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert mfu.table_peak("NVIDIA H100 PCIe", "fp8") == 1513e12
    assert mfu.table_peak("NVIDIA H100 NVL", "bf16") == 835e12
    assert mfu.table_peak("NVIDIA H100 80GB HBM3", "fp8") == 1979e12  # SXM
    assert mfu.table_peak("NVIDIA H200", "bf16") == 989e12


def test_model_step_flops_match_the_config():
    from nemo_neva import build_model
    from tests.model.helpers import tiny_model_cfg

    model = build_model(tiny_model_cfg())
    flops = mfu.step_flops_for(model)
    assert flops.stage == "pretrain"  # the shipped pretrain config freezes the LM
    n_lm = sum(p.numel() for p in model.model.language_model.parameters())
    got = flops(rows=1, seq_length=64, images=0)
    # matmul weights are most of this tiny LM's parameters: 4 FLOPs each per token (forward + input grads)
    assert 0.5 * 4 * n_lm * 64 < got < 4 * n_lm * 64 + 3 * 4 * 64 * 64 * 64 * 2
