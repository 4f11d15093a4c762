"""Left-padded batches of prompts: tokens, which slots are real, positions, attention masks.

Masks follow megatron-core: boolean [b, 1, sq, sk], True = masked out. A batch without padding gets no
mask at all, so it runs exactly the unpadded path (causal attention in the core attention).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

PAD_ID = 0  # any id that is not the image placeholder; padded slots are masked out


def left_pad(prompts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D token tensors -> (tokens [b, s], valid [b, s] bool), each prompt right-aligned."""
    length = max(p.numel() for p in prompts)
    tokens = torch.full((len(prompts), length), PAD_ID, dtype=torch.long)
    valid = torch.zeros((len(prompts), length), dtype=torch.bool)
    for row, p in enumerate(prompts):
        tokens[row, length - p.numel():] = p
        valid[row, length - p.numel():] = True
    return tokens, valid


def positions(valid: torch.Tensor) -> torch.Tensor:
    """Position ids counting real tokens only: the first real token of every row is position 0."""
    return (valid.long().cumsum(dim=1) - 1).clamp(min=0)


def prefill_mask(valid: torch.Tensor) -> Optional[torch.Tensor]:
    """Causal mask that also hides padding keys. A padding query still sees itself, so its row is never
    fully masked (that would make NaNs, which would then poison the cached values of later steps)."""
    if bool(valid.all()):
        return None
    s = valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
    allowed = causal & valid[:, None, :] | torch.eye(s, dtype=torch.bool, device=valid.device)
    return ~allowed[:, None]


def decode_mask(valid: torch.Tensor) -> Optional[torch.Tensor]:
    """One new query per row that may see every real key so far."""
    if bool(valid.all()):
        return None
    return ~valid[:, None, None, :]
