"""The image splice: megatron-core's embedding of a prompt with the projected image features in place of its
image placeholders, as the `decoder_input` that GPTModel.forward takes (no hook, no state between calls)."""
from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel


def embed_with_images(embedding, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                      feats: torch.Tensor) -> torch.Tensor:
    """`embedding(input_ids, position_ids)` ([s, b, h]; under sequence parallelism this rank's [s/tp, b, h]
    slice) with the rows where `mask` [b, s] is True replaced by `feats` [mask.sum(), h] (in mask order).

    A feature takes the place of a word embedding, so it gets what megatron-core adds to a word embedding:
    the learned position embedding of its position and the embedding dropout (`embedding` is a
    LanguageModelEmbedding; a features-only tensor is dropped out on its own, so only when dropout is on)."""
    out = embedding(input_ids=input_ids, position_ids=position_ids)
    config = embedding.config
    x = feats.to(embedding.word_embeddings.weight.dtype)
    if embedding.add_position_embedding:
        x = x + embedding.position_embeddings(position_ids)[mask]
    sliced = bool(config.sequence_parallel)
    if sliced:
        # This rank keeps only its sequence slice, so its backward reaches only that slice's rows: an all-reduce of
        # their gradient over TP (identity forward) gives every rank the whole batch's gradient for the replicated
        # projector / image_newline / tower / position embeddings, as the embedding's own scatter does for words.
        x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
    x = x.to(out.dtype)
    if embedding.training and embedding.embedding_dropout.p > 0:
        if sliced:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                x = embedding.embedding_dropout(x)
        else:
            x = embedding.embedding_dropout(x)
    full = torch.zeros(*mask.shape, x.shape[-1], dtype=out.dtype, device=out.device)
    full[mask] = x
    # [s, b, ...] as megatron-core's hidden states, contiguous: pipeline stages send them as they are
    full, keep = full.transpose(0, 1).contiguous(), (~mask).transpose(0, 1).contiguous()
    if sliced:
        chunk = out.shape[0]
        start = parallel_state.get_tensor_model_parallel_rank() * chunk
        full, keep = full[start:start + chunk], keep[start:start + chunk]
    return torch.where(keep.unsqueeze(-1), out, full)  # contiguous like its inputs
