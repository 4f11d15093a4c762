"""Paper model of NeVA training: parameter counts, per-GPU memory and expected throughput.

Pure arithmetic (no torch import), so it runs anywhere. The formulas are explained in docs/PARALLELISM.md;
`scripts/memory_model.py` is the command-line front end. The parameter counts are exact for the modules
this repository builds (tests/test_memory_model.py compares them with `sum(p.numel())` of a real
MegatronNevaModel); memory and throughput are estimates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

GIB = 1024 ** 3

# H100 SXM dense peak (no sparsity), TFLOP/s. Source: NVIDIA H100 datasheet (SXM5: 989 bf16, 1979 fp8).
H100_PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0}


# ----------------------------------------------------------------------------- model descriptions
@dataclass(frozen=True)
class LMShape:
    """The megatron-core GPTModel as nemo_neva builds it (language_model.build_gpt)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int                      # padded (what the embedding table holds)
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    max_position_embeddings: int = 4096  # only used with learned_absolute
    position_embedding_type: str = "rope"
    normalization: str = "RMSNorm"
    gated: bool = True                   # swiglu/geglu: fc1 is [2*ffn, h]
    bias: bool = False
    tied_embeddings: bool = False

    @property
    def groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class VisionShape:
    """Hugging Face CLIP / SigLIP vision tower (all its layers are built, whatever the select layer)."""

    kind: str = "clip"                   # clip | siglip
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    drop_cls: bool = True
    siglip_head: bool = True             # SigLIP's attention-pooling head (HF vision_use_head)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        return self.num_patches + (1 if self.kind == "clip" else 0)

    @property
    def tokens_per_image(self) -> int:
        return self.num_patches if (self.drop_cls or self.kind != "clip") else self.num_patches + 1


@dataclass(frozen=True)
class NevaShape:
    lm: LMShape
    vision: VisionShape = field(default_factory=VisionShape)
    projector: str = "mlp2x_gelu"        # linear | mlpNx_gelu


# CLIP ViT-L/14 at 336 px (LLaVA-1.5's tower, openai/clip-vit-large-patch14-336): width 1024, 24 layers,
# 16 heads, MLP 4096, patch 14 -> 576 patches + CLS.
CLIP_VIT_L_14_336 = VisionShape()

# NGC NeVA LM sizes. No internet here: these are *assumed* GPT configs of the right class, chosen so the
# totals land on the names (see docs/PARALLELISM.md): 256k-vocab NVIDIA GPTs with RoPE and no biases.
NGC_LMS = {
    # Nemotron-3-8B class: 32 x 4096, 32 heads, ffn 4h non-gated, 256k vocab, untied -> 8.5e9
    "8B": LMShape(num_layers=32, hidden_size=4096, ffn_hidden_size=16384, num_attention_heads=32,
                  vocab_size=256000, normalization="LayerNorm", gated=False),
    # 22B class: 40 x 6144, 48 heads, ffn 4h non-gated -> 21.3e9
    "22B": LMShape(num_layers=40, hidden_size=6144, ffn_hidden_size=24576, num_attention_heads=48,
                   vocab_size=256000, normalization="LayerNorm", gated=False),
    # 43B class: 48 x 8192, 64 heads, swiglu ffn 21760 (~2.66h) -> 42.7e9
    "43B": LMShape(num_layers=48, hidden_size=8192, ffn_hidden_size=21760, num_attention_heads=64,
                   vocab_size=256000, normalization="LayerNorm", gated=True),
}


def ngc_model(name: str) -> NevaShape:
    return NevaShape(lm=NGC_LMS[name], vision=CLIP_VIT_L_14_336, projector="mlp2x_gelu")


# ----------------------------------------------------------------------------- parameter counts
def _norm_params(normalization: str, h: int) -> int:
    return 2 * h if normalization == "LayerNorm" else h


def lm_layer_params(lm: LMShape, tp: int = 1) -> int:
    """Parameters of one decoder layer held by one tensor-parallel rank (exact at tp=1).

    Column-parallel linear_qkv / linear_fc1 split weight and bias by tp; row-parallel linear_proj /
    linear_fc2 split the weight, their bias and the norms are replicated."""
    h, f = lm.hidden_size, lm.ffn_hidden_size
    q = lm.num_attention_heads * lm.head_dim
    kv = lm.groups * lm.head_dim
    fc1_out = 2 * f if lm.gated else f
    sharded = h * (q + 2 * kv) + q * h + h * fc1_out + f * h
    replicated = 2 * _norm_params(lm.normalization, h)
    if lm.bias:
        sharded += (q + 2 * kv) + fc1_out
        replicated += 2 * h
    return sharded // tp + replicated


def lm_embedding_params(lm: LMShape, tp: int = 1) -> int:
    n = lm.vocab_size * lm.hidden_size // tp
    if lm.position_embedding_type == "learned_absolute":
        n += lm.max_position_embeddings * lm.hidden_size
    return n


def lm_head_params(lm: LMShape, tp: int = 1) -> int:
    """Final norm + output layer (none when tied: the word embedding is reused)."""
    out = 0 if lm.tied_embeddings else lm.vocab_size * lm.hidden_size // tp
    return _norm_params(lm.normalization, lm.hidden_size) + out


def lm_params(lm: LMShape) -> int:
    return lm_embedding_params(lm) + lm.num_layers * lm_layer_params(lm) + lm_head_params(lm)


def vision_params(v: VisionShape) -> int:
    d, i = v.hidden_size, v.intermediate_size
    layer = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 2 * (2 * d)  # q,k,v,out; fc1, fc2; 2 LayerNorms
    n = v.num_layers * layer + 2 * d  # + post_layernorm
    if v.kind == "clip":
        n += d + 3 * v.patch_size ** 2 * d + v.seq_len * d + 2 * d  # class emb, conv (no bias), positions, pre-LN
    elif v.kind == "siglip":
        n += 3 * v.patch_size ** 2 * d + d + v.num_patches * d  # conv with bias, positions
        if v.siglip_head:  # probe, nn.MultiheadAttention (in_proj 3d x d + bias, out_proj), LayerNorm, MLP
            n += d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * i + i) + (i * d + d)
    else:
        raise ValueError(f"vision kind {v.kind!r}; supported: clip, siglip")
    return n


def projector_params(kind: str, vision_hidden: int, llm_hidden: int) -> int:
    if kind == "linear":
        return vision_hidden * llm_hidden + llm_hidden
    if kind.startswith("mlp") and kind.endswith("x_gelu"):
        depth = int(kind[3:-6])
        return (vision_hidden * llm_hidden + llm_hidden) + (depth - 1) * (llm_hidden * llm_hidden + llm_hidden)
    raise ValueError(f"projector {kind!r}; supported: linear, mlpNx_gelu")


def neva_params(m: NevaShape) -> dict:
    parts = {
        "lm": lm_params(m.lm),
        "vision": vision_params(m.vision),
        "projector": projector_params(m.projector, m.vision.hidden_size, m.lm.hidden_size),
    }
    parts["total"] = sum(parts.values())
    return parts


# ----------------------------------------------------------------------------- layouts and memory
@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    seq_length: int = 4096
    global_batch_size: int = 128
    recompute: Optional[str] = None      # None | selective | full
    recompute_method: str = "uniform"    # full: uniform | block
    recompute_num_layers: int = 1
    distributed_optimizer: bool = True
    precision: str = "bf16"              # bf16 | fp8 (LM GEMMs through TE) | fp32
    stage: str = "finetune"              # pretrain (projector learns) | finetune (LM + projector learn)
    flash_attention: bool = True         # TE fused/flash attention: no s^2 score tensor kept
    dropout: bool = False                # hidden dropout masks kept (NeVA recipes use 0.0)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_microbatches(self) -> int:
        return max(1, self.global_batch_size // (self.micro_batch_size * self.dp))


def activation_bytes_per_layer(lm: LMShape, lay: Layout, full_layer: bool = True) -> float:
    """Bytes one decoder layer keeps for backward, per micro-batch, on one TP rank.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") generalised to
    GQA, gated MLPs and flash attention: GEMM inputs, norm inputs, Q/K/V, attention output, MLP activations.
    `full_layer=False`: only the layer input is kept (full recompute)."""
    s, b, h, t = lay.seq_length, lay.micro_batch_size, lm.hidden_size, lay.tp
    sp_div = t if lay.sequence_parallel else 1
    if not full_layer:
        return 2 * s * b * h / sp_div
    f, a = lm.ffn_hidden_size, lm.num_attention_heads
    q = a * lm.head_dim
    kv = lm.groups * lm.head_dim
    gemm_in = 1 if lay.precision == "fp8" else 2  # TE keeps FP8 copies of GEMM inputs
    # outside the TP region (replicated across TP ranks unless sequence parallel):
    # norm1 input, QKV GEMM input, norm2 input, fc1 GEMM input (+ two dropout masks)
    outside = (2 + gemm_in + 2 + gemm_in) * s * b * h + (2 * s * b * h if lay.dropout else 0)
    # inside the TP region (split by tp): Q, K, V, attention output (= proj GEMM input), MLP activations
    fc1_out = 2 * f if lm.gated else f
    inside = 2 * s * b * (q + 2 * kv) + gemm_in * s * b * q + 2 * s * b * fc1_out + gemm_in * s * b * f
    if not lay.flash_attention and lay.recompute != "selective":
        inside += 5 * a * s * s * b  # softmax output, dropout mask, dropout output
    return outside / sp_div + inside / t


def _stage_layers(lm: LMShape, lay: Layout) -> int:
    if lm.num_layers % lay.pp:
        raise ValueError(f"num_layers={lm.num_layers} is not divisible by pp={lay.pp}")
    return lm.num_layers // lay.pp


def activation_bytes_stage(m: NevaShape, lay: Layout, first: bool) -> float:
    lm = m.lm
    n = _stage_layers(lm, lay)
    full = activation_bytes_per_layer(lm, lay)
    inp = activation_bytes_per_layer(lm, lay, full_layer=False)
    if lay.recompute == "full":
        k = min(lay.recompute_num_layers, n)
        if lay.recompute_method == "uniform":  # keep each chunk's input; one chunk is live while recomputing
            per_mb = math.ceil(n / k) * inp + k * full
        else:  # block: the first k layers of the stage recomputed, the rest stored
            per_mb = k * inp + (n - k) * full + (full if k else 0)
    else:
        per_mb = n * full
    s, b = lay.seq_length, lay.micro_batch_size
    if first:  # embedding output; the projector's input (its weight gradient needs it)
        per_mb += 2 * s * b * lm.hidden_size / (lay.tp if lay.sequence_parallel else 1)
        per_mb += 2 * b * m.vision.tokens_per_image * m.vision.hidden_size
    last = (not first) or lay.pp == 1
    logits = 6 * s * b * lm.vocab_size / lay.tp if last else 0  # bf16 logits + fp32 softmax for the CE
    # 1F1B: stage i keeps min(pp - i, microbatches) micro-batches in flight; the first stage the most.
    in_flight = min(lay.pp, lay.num_microbatches) if first else 1
    return per_mb * in_flight + logits


def stage_params(m: NevaShape, lay: Layout, first: bool) -> dict:
    """Parameters on one GPU of the first or the last pipeline stage, split trainable / frozen."""
    lm = m.lm
    n = _stage_layers(lm, lay)
    layers = n * lm_layer_params(lm, lay.tp)
    lm_part = layers
    last = (not first) or lay.pp == 1
    if first:
        lm_part += lm_embedding_params(lm, lay.tp)
    if last:
        lm_part += lm_head_params(lm, lay.tp)
        if lm.tied_embeddings and lay.pp > 1:  # the last stage holds its own copy of the word embedding
            lm_part += lm.vocab_size * lm.hidden_size // lay.tp
    vision = vision_params(m.vision) if first else 0
    proj = projector_params(m.projector, m.vision.hidden_size, lm.hidden_size) if first else 0
    lm_trainable = lay.stage == "finetune"
    return {
        "trainable": proj + (lm_part if lm_trainable else 0),
        "frozen": vision + (0 if lm_trainable else lm_part),
        "lm_gemm": n * (lm_layer_params(lm, lay.tp) - 2 * _norm_params(lm.normalization, lm.hidden_size)),
    }


def memory_per_gpu(m: NevaShape, lay: Layout) -> dict:
    """GiB per GPU on the worse of the first / last pipeline stage: weights, grads, optimizer, activations.

    bf16/fp8: weights bf16 (2 B), grads fp32 (4 B, megatron-core DDP grad_reduce_in_fp32=True),
    Adam: fp32 master + 2 moments (12 B), divided by dp with the distributed optimizer. Frozen parameters
    (vision tower; the LM in stage 1) hold weights only. fp8 adds TE's FP8 weight copies (~2 B per LM GEMM
    parameter: the weight and its transpose). fp32: 4 B weights, 4 B grads, 8 B moments (no master copy)."""
    if lay.precision not in ("bf16", "fp8", "fp32"):
        raise ValueError(f"precision {lay.precision!r}; supported: bf16, fp8, fp32")
    w_bytes, g_bytes, o_bytes = (4, 4, 8) if lay.precision == "fp32" else (2, 4, 12)
    best = None
    for first in ((True, False) if lay.pp > 1 else (True,)):
        p = stage_params(m, lay, first)
        opt_div = lay.dp if lay.distributed_optimizer else 1
        out = {
            "weights": (p["trainable"] + p["frozen"]) * w_bytes,
            "grads": p["trainable"] * g_bytes,
            "optimizer": p["trainable"] * o_bytes / opt_div,
            "fp8_weight_cache": 2 * p["lm_gemm"] if lay.precision == "fp8" else 0,
            "activations": activation_bytes_stage(m, lay, first),
        }
        out = {k: v / GIB for k, v in out.items()}
        out["total"] = sum(out.values())
        out["stage"] = "first" if first else "last"
        if best is None or out["total"] > best["total"]:
            best = out
    return best


# ----------------------------------------------------------------------------- throughput
def flops_per_sample(m: NevaShape, lay: Layout, recompute_counted: bool = False) -> dict:
    """Training FLOPs for one sequence (seq_length tokens, one image), split by GEMM precision.

    Matmuls: 2 FLOPs per parameter per token forward; backward 2x forward when weights learn (activation +
    weight gradients), 1x when frozen (activation gradients only, still needed to reach the projector).
    Attention core: 4*s*(heads*head_dim) per token and layer forward (QK^T and AV; causal masking not
    halved, the usual MFU convention), backward 2x. Vision tower: frozen, forward only.
    `recompute_counted`: add the recomputed forward (hardware FLOPs instead of model FLOPs)."""
    lm, v, s = m.lm, m.vision, lay.seq_length
    q = lm.num_attention_heads * lm.head_dim
    layer_mm = lm_layer_params(lm) - 2 * _norm_params(lm.normalization, lm.hidden_size)
    lm_mm = lm.num_layers * layer_mm + lm.vocab_size * lm.hidden_size  # + output layer GEMM
    bwd = 2 if lay.stage == "finetune" else 1
    gemm_fwd = 2 * lm_mm * s
    attn_fwd = 4 * s * s * q * lm.num_layers
    lm_gemm = gemm_fwd * (1 + bwd)
    lm_attn = attn_fwd * 3
    if recompute_counted and lay.recompute == "full":
        lm_gemm += gemm_fwd
        lm_attn += attn_fwd
    elif recompute_counted and lay.recompute == "selective":
        lm_attn += attn_fwd
    vd = v.hidden_size
    vis_mm = v.num_layers * (4 * vd * vd + 2 * vd * v.intermediate_size) + 3 * v.patch_size ** 2 * vd
    vision = 2 * vis_mm * v.seq_len + 4 * v.seq_len ** 2 * vd * v.num_layers
    proj = 6 * projector_params(m.projector, vd, lm.hidden_size) * v.tokens_per_image
    return {"lm_gemm": lm_gemm, "lm_attention": lm_attn, "vision": vision, "projector": proj,
            "total": lm_gemm + lm_attn + vision + proj}


def tokens_per_second(m: NevaShape, lay: Layout, mfu: float = 0.4, peak_tflops: Optional[dict] = None) -> dict:
    """Expected training throughput at a given MFU: LM GEMMs at the fp8 peak when precision=fp8, the rest
    (attention core, vision, projector) at the bf16 peak. `mfu` is the utilisation while a GPU is busy; the
    1F1B pipeline bubble (pp - 1) / (m + pp - 1), m = micro-batches per step, comes on top.
    Returns tokens/s for the whole job and per GPU."""
    peak = {k: v * 1e12 for k, v in (peak_tflops or H100_PEAK_TFLOPS).items()}
    f = flops_per_sample(m, lay)
    gemm_peak = peak["fp8"] if lay.precision == "fp8" else peak["bf16"]
    seconds_per_sample_one_gpu = (f["lm_gemm"] / gemm_peak + (f["total"] - f["lm_gemm"]) / peak["bf16"]) / mfu
    m_count = lay.num_microbatches
    busy = m_count / (m_count + lay.pp - 1)
    per_gpu = busy * lay.seq_length / seconds_per_sample_one_gpu
    return {"tokens_per_s": per_gpu * lay.world, "tokens_per_s_per_gpu": per_gpu,
            "flops_per_token": f["total"] / lay.seq_length, "pipeline_busy": busy}


def from_model_cfg(cfg, vocab_size: int, vision_config) -> NevaShape:
    """NevaShape for a nemo_neva `model` config (OmegaConf/dict), its padded vocabulary and the HF vision
    config (CLIPVisionConfig / SiglipVisionConfig)."""
    get = cfg.get
    activation = get("activation", "gelu")
    lm = LMShape(
        num_layers=cfg["num_layers"], hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["ffn_hidden_size"],
        num_attention_heads=cfg["num_attention_heads"], num_query_groups=get("num_query_groups"),
        kv_channels=get("kv_channels"), vocab_size=vocab_size,
        max_position_embeddings=cfg["encoder_seq_length"],
        position_embedding_type=get("position_embedding_type", "learned_absolute"),
        normalization=get("normalization", "LayerNorm"), gated=activation in ("swiglu", "geglu"),
        bias=get("bias", True), tied_embeddings=get("share_embeddings_and_output_weights", False),
    )
    kind = "siglip" if "siglip" in type(vision_config).__name__.lower() else "clip"
    venc = cfg["mm_cfg"]["vision_encoder"]
    vision = VisionShape(
        kind=kind, hidden_size=vision_config.hidden_size, intermediate_size=vision_config.intermediate_size,
        num_layers=vision_config.num_hidden_layers, num_heads=vision_config.num_attention_heads,
        image_size=vision_config.image_size, patch_size=vision_config.patch_size,
        drop_cls=venc.get("drop_cls", True), siglip_head=getattr(vision_config, "vision_use_head", True) is not False,
    )
    return NevaShape(lm=lm, vision=vision, projector=cfg["mm_cfg"]["mm_mlp_adapter_type"])


__all__ = [
    "LMShape", "VisionShape", "NevaShape", "Layout", "CLIP_VIT_L_14_336", "NGC_LMS", "ngc_model", "neva_params",
    "lm_params", "vision_params", "projector_params", "lm_layer_params", "memory_per_gpu",
    "activation_bytes_per_layer", "flops_per_sample", "tokens_per_second", "from_model_cfg", "replace",
    "H100_PEAK_TFLOPS",
]
