"""Zero-centred-gamma norms ("LayerNorm1p", Nemotron/NeMo GPT): the stored weight is gamma - 1 and the
norm applies (1 + weight), so weight decay pulls gamma towards 1 instead of 0. Initialised to weight 0.

Parameter names and shapes equal torch's `LayerNorm` / `RMSNorm` (and TE's with `zero_centered_gamma`),
so the checkpoint holds the same `weight`/`bias` tensors as TE's LayerNorm1p.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class LayerNorm1p(torch.nn.LayerNorm):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps)
        torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class RMSNorm1p(torch.nn.RMSNorm):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps)
        torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight + 1, self.eps)
