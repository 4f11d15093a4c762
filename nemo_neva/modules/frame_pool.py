"""Per-frame token pooling for video (`model.mm_cfg.video.pool`, LLaVA-NeXT-Video's spatial pooling).

A video frame costs as many placeholder tokens as an image: 8 frames of a 576-token tower are 4608 positions.
With `pool: 2x2` each frame's square grid of tower features is pooled 2x2 (average, or max) *before* the
projector, as transformers' `LlavaNextVideoForConditionalGeneration` does (its `vision_resampler`), so a frame
costs 4x fewer tokens; images are not pooled. `FramePool.tokens` is the one pooled count every path uses.

torch's own pooling; no parameters (a .nemo's weights do not change with it).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

MODES = ("average", "max")


@dataclass(frozen=True)
class FramePool:
    """`stride x stride` pooling of a frame's `side x side` feature grid (a side that is not a multiple of
    `stride` drops its last rows / columns, as torch's pooling without ceil_mode does)."""

    stride: int
    mode: str = "average"

    def tokens(self, patch_tokens: int) -> int:
        """Features a frame keeps of `patch_tokens` (a square grid) after pooling."""
        side = _side(patch_tokens)
        return (side // self.stride) ** 2

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        """[n, side*side, c] row-major tower features -> [n, (side // stride)^2, c]."""
        n, count, c = feats.shape
        side = _side(count)
        grid = feats.reshape(n, side, side, c).permute(0, 3, 1, 2)
        pool = F.avg_pool2d if self.mode == "average" else F.max_pool2d
        return pool(grid, self.stride, self.stride).flatten(2).transpose(1, 2)


def _side(patch_tokens: int) -> int:
    side = math.isqrt(patch_tokens)
    if side * side != patch_tokens:
        raise ValueError(f"model.mm_cfg.video.pool needs a square grid of tower features per frame, got "
                         f"{patch_tokens} (is the CLS token kept? set vision_encoder.drop_cls=true)")
    return side


def frame_pool_from_cfg(mm_cfg, patch_tokens: int) -> Optional[FramePool]:
    """`model.mm_cfg.video.{pool, pool_mode}` as a `FramePool` (None: no `pool`, frames cost an image's tokens).
    `patch_tokens`: the tower's features per image (the grid that is pooled), checked here."""
    video = (mm_cfg.get("video") if mm_cfg is not None else None) or {}
    spec = video.get("pool")
    if spec is None:
        return None
    match = re.fullmatch(r"(\d+)x(\d+)", str(spec).strip())
    if not match or match.group(1) != match.group(2) or int(match.group(1)) < 2:
        raise ValueError(f"model.mm_cfg.video.pool={spec!r}: expected 'NxN' with N >= 2 (e.g. '2x2'), or null")
    mode = video.get("pool_mode") or "average"
    if mode not in MODES:
        raise ValueError(f"model.mm_cfg.video.pool_mode={mode!r}: expected one of {MODES}")
    pool = FramePool(int(match.group(1)), mode)
    if pool.tokens(patch_tokens) < 1:
        raise ValueError(f"model.mm_cfg.video.pool={spec!r} is larger than the tower's feature grid "
                         f"({_side(patch_tokens)}x{_side(patch_tokens)})")
    return pool
