"""Layer specs for the megatron-core GPT decoder.

GPU with Transformer Engine -> TE spec (fused attention, FP8 capable).
Otherwise -> megatron-core's local layout built through `NevaLocalSpecProvider` (a `LocalSpecProvider`),
with `SDPACoreAttention` as core attention, because megatron-core's own `DotProductAttention` allocates its
score buffer on `torch.cuda.current_device()`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from nemo_neva.modules.rotated_kv_attention import RotatedKVCacheSelfAttention
from nemo_neva.modules.row_linear import RowParallelLinearOwnGroup

try:  # optional: never required
    import transformer_engine as _te  # noqa: F401  (availability probe)

    HAVE_TE = True
except Exception:  # ImportError, or a broken CUDA install
    HAVE_TE = False


def thd_segment_lengths(cu_q: torch.Tensor, cu_kv: torch.Tensor) -> list[int]:
    """Token count of every cu_seqlens segment (packed THD batch); queries and keys must be packed alike."""
    if not torch.equal(cu_q, cu_kv):
        raise ValueError("SDPACoreAttention: packed sequences need cu_seqlens_q == cu_seqlens_kv")
    return torch.diff(cu_q.to(torch.long)).tolist()


class SDPACoreAttention(MegatronModule):
    """Core attention on `F.scaled_dot_product_attention`; a drop-in for megatron-core's `core_attention`.

    Inputs follow megatron-core: q [sq, b, np, hn], k/v [sk, b, ng, hn] (already split per TP rank);
    output [sq, b, np*hn]. `attention_mask` may be a boolean mask [b|1, 1, sq, sk] where True means
    *masked out* (megatron convention): padded, or packed with a block-diagonal mask. With
    `packed_seq_params` (qkv_format 'thd', q/k/v [t, np, hn]) it attends within each cu_seqlens segment, as
    the TE path's THD kernels do.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs the Transformer Engine attention (GPU)")
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads_per_partition = config.num_attention_heads // tp
        self.groups_per_partition = config.num_query_groups // tp
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias=None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ):
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPACoreAttention")
        rep = self.heads_per_partition // self.groups_per_partition
        # Grouped-query attention: each K/V group serves `rep` query heads; SDPA's enable_gqa shares the
        # groups in place instead of copying K/V `rep` times (a copy forward and a sum backward per layer,
        # and a copy of the whole KV cache per decoded token). It is what HF's SDPA path does too.
        gqa = rep > 1
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self._attend(query, key, value, attention_mask, attn_mask_type, packed_seq_params,
                                    dropout, gqa)
        return self._attend(query, key, value, attention_mask, attn_mask_type, packed_seq_params, dropout, gqa)

    def _sdpa(self, q, k, v, mask, dropout, is_causal, gqa):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                              scale=self.softmax_scale, enable_gqa=gqa)

    def _attend(self, query, key, value, attention_mask, attn_mask_type, packed_seq_params, dropout, gqa):
        if packed_seq_params is not None:
            return self._attend_thd(query, key, value, packed_seq_params, dropout, gqa)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        sq, sk = q.shape[2], k.shape[2]
        mask = None
        is_causal = False
        if attention_mask is not None:
            # An explicit mask is honoured even as no_mask: megatron-core's KV cache switches to no_mask after
            # the prompt, but a left-padded generation batch must still hide its padding keys.
            mask = ~attention_mask.to(torch.bool)  # megatron: True = masked; SDPA: True = attend
        elif mask_type == AttnMaskType.causal:
            if sq == sk:
                is_causal = True
            else:  # decoding with a KV cache: queries are the last sq positions
                mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        ctx = self._sdpa(q, k, v, mask, dropout, is_causal, gqa)
        b, h, s, d = ctx.shape
        return ctx.permute(2, 0, 1, 3).reshape(s, b, h * d)

    def _attend_thd(self, query, key, value, packed_seq_params, dropout, gqa):
        """Packed THD batch (q/k/v [t, h, d], megatron-core squeezed the batch dim): causal attention inside
        each cu_seqlens segment, one SDPA call per segment, as TE's THD kernels do. Cost is quadratic in each
        sample's length, not in the packed row's (a block-diagonal mask over the row would compute and then
        discard every cross-sample score). Output [t, 1, h*d] like the bshd path with b = 1."""
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"SDPACoreAttention supports packed qkv_format 'thd' only, not "
                             f"{packed_seq_params.qkv_format!r}")
        lengths = thd_segment_lengths(packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv)
        if sum(lengths) != query.shape[0]:
            raise ValueError(f"SDPACoreAttention: cu_seqlens cover {sum(lengths)} tokens, q has {query.shape[0]}")
        # [t, h, d] -> [1, h, t, d]; each segment is a slice along t
        q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))
        out, start = [], 0
        for n in lengths:
            if n:
                seg = slice(start, start + n)
                ctx = self._sdpa(q[:, :, seg], k[:, :, seg], v[:, :, seg], None, dropout, True, gqa)
                out.append(ctx.permute(2, 0, 1, 3))  # [n, 1, h, d] view: the cat below is the only copy
            start += n
        ctx = torch.cat(out, dim=0)
        t, _, h, d = ctx.shape
        return ctx.view(t, 1, h * d)


class TorchNormSP:
    """torch `LayerNorm` / `RMSNorm` for the local spec that also works with sequence parallelism.

    megatron-core's `WrappedTorchNorm` (its fallback without Apex/TE) refuses `sequence_parallel`, because
    under SP each tensor-parallel rank normalises only its slice of the sequence, so the norm's weight and
    bias gradients are partial sums. Like Apex's `FusedLayerNorm`, this marks the parameters with
    `sequence_parallel`, which makes megatron-core's `finalize_model_grads` all-reduce them over the TP
    group. Parameter names and shapes equal `WrappedTorchNorm`'s, so checkpoints are interchangeable.
    `config.layernorm_zero_centered_gamma` (LayerNorm1p) gives the (1 + weight) norms of `modules/norms.py`;
    on the TE spec megatron-core passes the same flag to TE as `zero_centered_gamma`.
    """

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        from nemo_neva.modules.norms import LayerNorm1p, RMSNorm1p

        one_p = config.layernorm_zero_centered_gamma  # LayerNorm1p: weight stored as gamma - 1
        if config.normalization == "LayerNorm":
            norm = (LayerNorm1p if one_p else torch.nn.LayerNorm)(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = (RMSNorm1p if one_p else torch.nn.RMSNorm)(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization={config.normalization!r}; supported: LayerNorm, RMSNorm")
        for param in norm.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm


def use_transformer_engine(requested: bool) -> bool:
    """TE spec only when asked for and actually usable (TE importable and CUDA present)."""
    if not requested:
        return False
    if not HAVE_TE:
        raise RuntimeError(
            "model.transformer_engine=true but transformer_engine is not importable; "
            "install it (GPU) or set transformer_engine=false"
        )
    if not torch.cuda.is_available():
        raise RuntimeError("transformer_engine=true needs a CUDA GPU; set transformer_engine=false on CPU")
    return True


class NevaLocalSpecProvider(LocalSpecProvider):
    """megatron-core's local backend with the modules this project runs on CPU (and on GPU without TE).

    Plugged in where megatron-core picks modules (its `BackendSpecProvider` extension point), so the MLP
    spec comes from megatron-core's own builder in whatever form that version uses (a `ModuleSpec` in
    0.16, a `functools.partial` in 0.19) and no spec is edited after it was built.
    """

    def row_parallel_linear(self) -> type:
        return RowParallelLinearOwnGroup  # no group look-up per call

    def core_attention(self) -> type:
        return SDPACoreAttention

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        if for_qk:  # q/k norms stay megatron-core's own (no sequence-parallel partial sums there)
            return super().layer_norm(rms_norm=rms_norm, for_qk=True)
        return TorchNormSP


def local_layer_spec(normalization: str, qk_layernorm: bool = False) -> ModuleSpec:
    """One decoder layer from `NevaLocalSpecProvider`, laid out as megatron-core's local GPT layer (same
    submodule names, same sharded-key map, so checkpoints match), with `RotatedKVCacheSelfAttention`."""
    backend = NevaLocalSpecProvider()
    rms = normalization == "RMSNorm"
    norm = backend.layer_norm(rms_norm=rms)
    qk_norm = backend.layer_norm(rms_norm=rms, for_qk=True) if qk_layernorm else IdentityOp
    attention = ModuleSpec(
        module=RotatedKVCacheSelfAttention,  # RoPE once per key in generation
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(), core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(), q_layernorm=qk_norm, k_layernorm=qk_norm),
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm, self_attention=attention, self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm, mlp=get_mlp_module_spec_for_backend(backend=backend),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                                         "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )


def build_layer_spec(normalization: str, transformer_engine: bool, qk_layernorm: bool = False):
    """Return the ModuleSpec for one decoder layer."""
    if use_transformer_engine(transformer_engine):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    return local_layer_spec(normalization, qk_layernorm=qk_layernorm)


def build_decoder_spec(config: TransformerConfig, transformer_engine: bool, qk_layernorm: bool = False, vp_stage=None):
    """`transformer_layer_spec` for GPTModel covering the whole decoder of this pipeline stage.

    TE: the TE layer spec (megatron-core picks TENorm for the final norm). Local: every layer from
    `build_layer_spec` and `TorchNormSP` as the final norm, so sequence parallelism works without Apex/TE
    (megatron-core would otherwise pick `WrappedTorchNorm`, which refuses it).
    """
    layer = build_layer_spec(config.normalization, transformer_engine, qk_layernorm=qk_layernorm)
    if use_transformer_engine(transformer_engine):
        return layer
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=TorchNormSP
    )
