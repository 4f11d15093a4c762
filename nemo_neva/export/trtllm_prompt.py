"""How image features reach a TensorRT-LLM engine: the prompt embedding table.

TensorRT-LLM's embedding layer (PromptTuningEmbedding) looks token ids below `vocab_size` up in the word
embedding and ids `vocab_size + j` up as row `j` of a per-request prompt table. NeVA's prompt repeats the
image placeholder once per image feature position, so:
  - the prompt table of a request is its images' projected features, in order: [n_images * tokens_per_image, hidden]
  - the k-th image placeholder of the request becomes the fake id `vocab_size + k`
and the engine then sees exactly the input embeddings the .nemo model builds (see docs/TRTLLM.md).
Per request (C++ executor / in-flight batching) each request's ids start again at `vocab_size`; the
Python session instead takes one table for the whole batch, so row b's ids continue after row b-1's.
"""
from __future__ import annotations

import torch


def fake_prompt_ids(input_ids: torch.Tensor, image_token_id: int, vocab_size: int,
                    per_request: bool = True) -> torch.Tensor:
    """input_ids [b, s] with image placeholders -> ids where the k-th placeholder is `vocab_size + k`."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if bool((input_ids >= vocab_size).any()):
        raise ValueError(f"input_ids already contain ids >= vocab_size={vocab_size}")
    mask = input_ids == image_token_id
    counts = mask.sum(dim=1)
    offsets = torch.zeros_like(counts) if per_request else torch.cumsum(counts, 0) - counts
    k = torch.cumsum(mask.long(), dim=1) - 1 + offsets.unsqueeze(1)
    return torch.where(mask, vocab_size + k, input_ids)


def prompt_table(image_features: torch.Tensor) -> torch.Tensor:
    """[n_images, tokens_per_image, hidden] (the vision engine's output) -> [n_images * tokens_per_image, hidden]."""
    if image_features.dim() != 3:
        raise ValueError(f"image features must be [images, tokens, hidden], got {tuple(image_features.shape)}")
    return image_features.reshape(-1, image_features.shape[-1])


def max_prompt_embedding_table_size(max_batch_size: int, max_images_per_request: int, tokens_per_image: int) -> int:
    """Rows the engine's prompt table must hold (TensorRT-LLM sizes it for the whole batch)."""
    for name, value in (("max_batch_size", max_batch_size), ("max_images_per_request", max_images_per_request)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return max_batch_size * max_images_per_request * tokens_per_image
