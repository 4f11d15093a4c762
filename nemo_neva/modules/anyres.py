"""anyres (LLaVA-NeXT) on the feature side: one image's projected tile features -> its placeholder embeddings.

The geometry (grid, unpadded window, counts) is `nemo_neva.modules.tiling.Tiling`; this file only moves
features: base thumbnail first, then the tiles' `side x side` grids joined into one big grid, cut to the
window that shows the image, and the learned newline embedding appended to every row of it, row by row (the
order of transformers' `LlavaNextModel.pack_image_features`). Pure indexing and concatenation, so the values
are the projector's bit for bit.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def new_image_newline(hidden: int, dtype=torch.float32) -> nn.Parameter:
    """The learned row-end embedding, initialised like transformers' (normal, std 1/sqrt(hidden))."""
    return nn.Parameter(torch.randn(hidden, dtype=torch.float32).mul_(1 / math.sqrt(hidden)).to(dtype))


def pack_image(features: torch.Tensor, size: Sequence[int], tiling, newline: torch.Tensor) -> torch.Tensor:
    """features [tiles of the image (base first), side*side, hidden] -> [tiling.tokens(*size), hidden]."""
    height, width = int(size[0]), int(size[1])
    rows, cols = tiling.grid(height, width)
    side, hidden = tiling.side, features.shape[-1]
    top, bottom, left, right = tiling.window(height, width)
    grid = features[1:1 + rows * cols].reshape(rows, cols, side, side, hidden)
    grid = grid.permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, hidden)[top:bottom, left:right]
    ends = newline.to(grid.dtype).expand(grid.shape[0], 1, hidden)
    return torch.cat([features[0], torch.cat([grid, ends], dim=1).reshape(-1, hidden)])


def pack_images(features: torch.Tensor, sizes: Sequence[Sequence[int]], tiling, newline: torch.Tensor) -> torch.Tensor:
    """All images' tile features (concatenated in image order) -> their placeholder embeddings, concatenated."""
    tiles = [tiling.tiles(int(h), int(w)) for h, w in sizes]
    parts = torch.split(features, tiles)
    return torch.cat([pack_image(p, s, tiling, newline) for p, s in zip(parts, sizes)])


def image_tiles(pixels: torch.Tensor, sizes: Sequence[Sequence[int]], tiling) -> torch.Tensor:
    """Preprocessed images [n, max_tiles, 3, t, t] -> their own tiles (the zero tiles after them dropped), in image
    order: [sum of tiling.tiles, 3, t, t], what the tower sees."""
    tiles = [tiling.tiles(int(h), int(w)) for h, w in sizes]
    return torch.cat([pixels[i, :t] for i, t in enumerate(tiles)])
