"""megatron-core `SelfAttention` whose static KV cache holds keys *after* RoPE.

Why: with a static inference context and `flash_decode=False`, megatron-core 0.16.1 caches keys before
RoPE and rotates the whole cache again at every decoded token (`k_pos_emb[:sequence_end]`), which made
~15 % of a CPU decode step. Its `flash_decode=True` path caches rotated keys, but needs flash-attn kernels
(`flash_attn_with_kvcache`; without flash-attn its cos/sin RoPE fallback is not a rotation) and drops the
padding mask. Here the new keys (and queries) are rotated at their own slots before they enter the cache,
then megatron-core's bookkeeping runs with no rotary embedding left to apply. RoPE is elementwise per
position, so every cached key holds the same bits as before: logits are unchanged, the work per step no
longer grows with the cache. Training and the dynamic context take megatron-core's path untouched.
"""
from __future__ import annotations

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor_from_config
from megatron.core.transformer.attention import SelfAttention


class RotatedKVCacheSelfAttention(SelfAttention):
    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb,
                                        rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                                        sequence_len_offset=None, *, inference_params=None):
        context = inference_context if inference_context is not None else inference_params
        if (context is None or rotary_pos_emb is None or self.config.flash_decode
                or not context.is_static_batching()):
            return super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
                rotary_pos_cos_sin, sequence_len_offset, inference_params=inference_params)
        start = context.sequence_len_offset
        end = start + key.size(0)
        q_pos_emb, k_pos_emb = rotary_pos_emb
        # The same call and slots megatron-core uses (query: [start:end]; key: here only its new slots).
        rope = dict(config=self.config, mscale=_yarn_get_concentration_factor_from_config(self.config),
                    cp_group=self.pg_collection.cp)
        if q_pos_emb is not None:
            query = apply_rotary_pos_emb(query, q_pos_emb[start:end], **rope)
        if k_pos_emb is not None:
            key = apply_rotary_pos_emb(key, k_pos_emb[start:end], **rope)
        query, key, value, _, mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, None, rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
            sequence_len_offset, inference_params=inference_params)
        return query, key, value, None, mask_type, block_table
