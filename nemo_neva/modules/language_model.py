"""Config -> megatron-core TransformerConfig + GPTModel for the NeVA language model."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_neva.compat.mcore_range import check_megatron_core
from nemo_neva.modules.layer_specs import build_decoder_spec
from nemo_neva.modules.precision import fp8_transformer_config_kwargs, recompute_transformer_config_kwargs

_ACTIVATIONS = {
    # name -> (activation_func, gated_linear_unit)
    "gelu": (F.gelu, False),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), False),  # GPT-2's gelu_new
    "swiglu": (F.silu, True),
    "geglu": (F.gelu, True),
    "squared-relu": (lambda x: torch.pow(F.relu(x), 2), False),
}

_DTYPES = {"fp32": torch.float32, "32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16}


def params_dtype(precision) -> torch.dtype:
    key = str(precision)
    if key not in _DTYPES:
        raise ValueError(f"trainer.precision={precision!r} not supported; use 32 or bf16 (fp16 is not supported)")
    return _DTYPES[key]


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Pad to a multiple of `divisible_by` only, so the embedding shape (and thus the checkpoint) does not
    depend on the TP size; megatron-core then splits it across TP ranks."""
    padded = int(math.ceil(vocab / divisible_by) * divisible_by)
    if padded % tp:
        raise ValueError(
            f"padded vocabulary {padded} (model.make_vocab_size_divisible_by={divisible_by}) is not divisible by "
            f"tensor_model_parallel_size={tp}; use a make_vocab_size_divisible_by that is a multiple of {tp}"
        )
    return padded


_NORMS = {"layernorm": ("LayerNorm", False), "rmsnorm": ("RMSNorm", False),
          "layernorm1p": ("LayerNorm", True), "rmsnorm1p": ("RMSNorm", True)}


def normalization_settings(cfg) -> tuple[str, bool]:
    """`model.normalization` (LayerNorm | RMSNorm | LayerNorm1p | RMSNorm1p, any case) -> megatron-core's
    (normalization, layernorm_zero_centered_gamma). `model.layernorm_zero_centered_gamma=true` also works."""
    name = str(cfg.get("normalization", "LayerNorm"))
    if name.lower() not in _NORMS:
        raise ValueError(f"model.normalization={name!r}; supported: LayerNorm, RMSNorm, LayerNorm1p, RMSNorm1p")
    norm, zero_centered = _NORMS[name.lower()]
    return norm, zero_centered or bool(cfg.get("layernorm_zero_centered_gamma", False))


def build_transformer_config(cfg, dtype: torch.dtype) -> TransformerConfig:
    """cfg is `model` (NeMo-style keys at the top level of the model config)."""
    activation = cfg.get("activation", "gelu")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"model.activation={activation!r}; supported: {sorted(_ACTIVATIONS)}")
    act_fn, gated = _ACTIVATIONS[activation]
    tp = cfg.get("tensor_model_parallel_size", 1)
    heads = cfg.num_attention_heads
    groups = cfg.get("num_query_groups") or heads
    if heads % groups:
        raise ValueError(f"model.num_attention_heads={heads} must be divisible by model.num_query_groups={groups}")
    for name, value in (("num_attention_heads", heads), ("num_query_groups", groups)):
        if value % tp:
            works = ", ".join(str(t) for t in range(1, heads + 1) if heads % t == 0 and groups % t == 0)
            raise ValueError(
                f"model.{name}={value} is not divisible by model.tensor_model_parallel_size={tp}; "
                f"TP sizes that work: {works}"
            )
    normalization, zero_centered = normalization_settings(cfg)
    rotary_percentage = cfg.get("rotary_percentage", 1.0)
    if not 0.0 < rotary_percentage <= 1.0:
        raise ValueError(f"model.rotary_percentage={rotary_percentage}; must be in (0, 1]")
    on_gpu = torch.cuda.is_available()
    fp8 = fp8_transformer_config_kwargs(cfg, cfg.hidden_size, cfg.ffn_hidden_size)
    recompute = recompute_transformer_config_kwargs(cfg, cfg.num_layers, cfg.get("pipeline_model_parallel_size", 1))
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=cfg.get("kv_channels") or cfg.hidden_size // heads,
        normalization=normalization,
        layernorm_epsilon=cfg.get("layernorm_epsilon", 1e-5),
        layernorm_zero_centered_gamma=zero_centered,
        activation_func=act_fn,
        gated_linear_unit=gated,
        add_bias_linear=cfg.get("bias", True),
        add_qkv_bias=bool(cfg.get("qkv_bias", False)),  # Qwen2: q/k/v biases only
        hidden_dropout=cfg.get("hidden_dropout", 0.0),
        attention_dropout=cfg.get("attention_dropout", 0.0),
        init_method_std=cfg.get("init_method_std", 0.02),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=cfg.get("pipeline_model_parallel_size", 1),
        sequence_parallel=cfg.get("sequence_parallel", False),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        **recompute,  # recompute_granularity/method/num_layers, validated (modules/precision.py)
        **fp8,  # fp8, fp8_recipe, fp8_margin, ...: megatron-core's TransformerBlock applies fp8_autocast
        # CPU: no fused kernels, parameters initialised on the host.
        use_cpu_initialization=not on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        gradient_accumulation_fusion=False,
        persist_layer_norm=on_gpu,
        apply_rope_fusion=False,
    )


def mark_tensor_parallel(gpt) -> None:
    """megatron-core 0.16 marks a parallel layer's weight as tensor-parallel (partition dim, stride) only while
    initialising it; later releases mark it either way. DDP, the optimizer's grad norm and the loaders read the
    marks, so weights built without the init get them here as those releases set them (TE layers mark their own)."""
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                                      set_tensor_model_parallel_attributes)

    for name, module in gpt.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or hasattr(weight, "tensor_model_parallel"):
            continue
        if isinstance(module, RowParallelLinear):
            dim = 1
        elif isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        else:
            continue
        # the stride megatron-core passes: 2 for a gated MLP's fc1 ([gate; up] interleaved per rank), else 1
        glu_fc1 = name.endswith("mlp.linear_fc1") and gpt.config.gated_linear_unit
        stride = getattr(getattr(module, "bias", None), "partition_stride", 2 if glu_fc1 else 1)
        set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=stride)


_ROPE_SCALING = ("llama3", "linear")


def rope_scaling_args(cfg) -> dict:
    """`model.rope_scaling` ({type: llama3, factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings} or {type: linear, factor}) -> GPTModel keyword arguments."""
    scaling = cfg.get("rope_scaling")
    if not scaling:
        return {}
    kind = scaling.get("type")
    if kind not in _ROPE_SCALING:
        raise ValueError(f"model.rope_scaling.type={kind!r}; supported: {', '.join(_ROPE_SCALING)}")
    if kind == "linear":
        return {"seq_len_interpolation_factor": float(scaling["factor"])}
    return {"rope_scaling": True, "rope_scaling_factor": float(scaling["factor"])}


def build_gpt(cfg, config: TransformerConfig, vocab_size: int, pre_process: bool, post_process: bool,
              initialize: bool = True) -> GPTModel:
    """The GPTModel of `cfg`. `initialize=False` skips megatron-core's random initialisation (weights and biases
    are allocated, not drawn): only for callers that overwrite every parameter right after (a pretrained LM, a
    .nemo restore, the HF converters), whose loaders refuse to leave one unset. Norm gains are still ones."""
    check_megatron_core()  # also for callers that import nemo_neva.modules alone
    spec = build_decoder_spec(config, cfg.get("transformer_engine", False))
    previous, config.perform_initialization = config.perform_initialization, initialize
    try:
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab_size,
            max_sequence_length=cfg.encoder_seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=cfg.get("share_embeddings_and_output_weights", False),
            position_embedding_type=cfg.get("position_embedding_type", "learned_absolute"),
            rotary_percent=cfg.get("rotary_percentage", 1.0),
            rotary_base=cfg.get("rotary_base", 10000),
            **rope_scaling_args(cfg),
        )
    finally:
        # The config is shared with everything built later (LoRA adapters, a merged layer): they initialise
        # as the caller's config says.
        config.perform_initialization = previous
    if not initialize:
        mark_tensor_parallel(gpt)
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("type") == "llama3" and hasattr(gpt, "rotary_pos_emb"):
        # megatron-core 0.16.1's GPTModel fixes low/high_freq_factor = 1/4 and original context 8192 (Llama 3.1);
        # other values (e.g. a shorter original context) go through its own scaling function.
        rope = gpt.rotary_pos_emb
        dim = int(config.kv_channels * cfg.get("rotary_percentage", 1.0))
        base = 1.0 / (float(cfg.get("rotary_base", 10000)) ** (
            torch.arange(0, dim, 2, dtype=torch.float32, device=rope.inv_freq.device) / dim))
        rope.inv_freq = rope._apply_scaling(
            base, factor=float(scaling["factor"]), low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=float(scaling.get("original_max_position_embeddings", 8192)))
    return gpt
