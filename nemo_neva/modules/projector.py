"""Vision-to-language projectors: `linear`, `mlpNx_gelu` (LLaVA-1.5 uses mlp2x_gelu) and `mlp_downsample`.

`mlp_downsample` merges each 2x2 block of neighbouring patches into one token (their 4 feature vectors
concatenated), so an image costs 4x fewer LM positions; then LayerNorm -> Linear -> GELU -> Linear.
A grid with an odd side is padded with zero features on the right/bottom edge before merging.
The order is NeMo 1's (its NeVA `DownSampleBlock`, whose name this is): inside a token the block's patches row by
row (top-left, top-right, bottom-left, bottom-right), and the tokens block column by block column (all blocks of
the first two patch columns top to bottom, then the next two columns).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = "linear, mlpNx_gelu (e.g. mlp2x_gelu), mlp_downsample"


class PatchMerge2x2(nn.Module):
    """[n, side*side, c] patch features (row-major grid) -> [n, ceil(side/2)^2, 4c], blocks in NeMo 1's order
    (column-block major, see the module docstring)."""

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        n, tokens, c = feats.shape
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"mlp_downsample needs a square patch grid, got {tokens} patch features "
                             "(is the CLS token still there? set vision_encoder.drop_cls=true)")
        grid = feats.reshape(n, side, side, c)
        if side % 2:  # pad the odd edge: the last row/column of blocks holds zeros for the missing patches
            grid = F.pad(grid, (0, 0, 0, 1, 0, 1))
            side += 1
        half = side // 2
        # [n, row-block, 2, col-block, 2, c] -> [n, col-block, row-block, 2 (row), 2 (col), c]
        blocks = grid.reshape(n, half, 2, half, 2, c).permute(0, 3, 1, 2, 4, 5)
        return blocks.reshape(n, half * half, 4 * c)


def merged_tokens(patch_tokens: int) -> int:
    """Tokens left after the 2x2 merge of a square grid of `patch_tokens` patches."""
    side = math.isqrt(patch_tokens)
    if side * side != patch_tokens:
        raise ValueError(f"mlp_downsample needs a square patch grid, got {patch_tokens} patch tokens")
    return ((side + 1) // 2) ** 2


def projected_tokens(kind: str, patch_tokens: int) -> int:
    """Image placeholder tokens per image after projector `kind` sees `patch_tokens` features."""
    return merged_tokens(patch_tokens) if kind == "mlp_downsample" else patch_tokens


def build_projector(kind: str, vision_hidden: int, llm_hidden: int) -> nn.Module:
    """Projector by name. Replicated on every TP rank (it is small and its grads agree across ranks)."""
    if kind == "linear":
        return nn.Linear(vision_hidden, llm_hidden)
    if kind == "mlp_downsample":
        merged = 4 * vision_hidden
        return nn.Sequential(PatchMerge2x2(), nn.LayerNorm(merged), nn.Linear(merged, llm_hidden), nn.GELU(),
                             nn.Linear(llm_hidden, llm_hidden))
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match:
        depth = int(match.group(1))
        if depth < 1:
            raise ValueError(f"mm_mlp_adapter_type {kind!r}: depth must be >= 1")
        layers = [nn.Linear(vision_hidden, llm_hidden)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(llm_hidden, llm_hidden)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown model.mm_cfg.mm_mlp_adapter_type {kind!r}; supported: {SUPPORTED}")
