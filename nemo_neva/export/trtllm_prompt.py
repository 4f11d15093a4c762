"""How image features reach a TensorRT-LLM engine: the prompt embedding table.

TensorRT-LLM's embedding layer (PromptTuningEmbedding) looks token ids below `vocab_size` up in the word
embedding and ids `vocab_size + j` up as row `j` of a per-request prompt table. NeVA's prompt repeats the
image placeholder once per image feature position, so:
  - the prompt table of a request is its images' projected features, in order: [n_images * tokens_per_image, hidden]
  - the k-th image placeholder of the request becomes the fake id `vocab_size + k`
and the engine then sees exactly the input embeddings the .nemo model builds (see docs/TRTLLM.md).
Per request (C++ executor / in-flight batching) each request's ids start again at `vocab_size`; the
Python session instead takes one table for the whole batch, so row b's ids continue after row b-1's.

A tiled model (anyres, `image_tiling` in nemo_neva_export.json) gives an image `Tiling.tokens(h, w)` rows, by its
size: the vision engine encodes each image's own tiles (base thumbnail first) and `tiled_prompt_table` packs them
as the .nemo model does (`nemo_neva.modules.anyres.pack_images`: base grid, unpadded tile grid, the exported
`image_newline` closing each row), so a request's table is still its images' rows, in order.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from nemo_neva.modules.anyres import image_tiles, pack_images
from nemo_neva.modules.tiling import Tiling, check_pinpoints

__all__ = ["fake_prompt_ids", "prompt_table", "max_prompt_embedding_table_size", "export_tiling",
           "load_image_newline", "image_tiles", "tiled_prompt_table", "max_tokens_per_image"]
NEWLINE_KEY = "image_newline"  # the tensor's name in vision/image_newline.safetensors


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


def max_tokens_per_image(meta: dict) -> int:
    """Prompt-table rows one image can take: `tokens_per_image`, or for a tiled export its largest grid's count."""
    return int(meta.get("max_tokens_per_image") or meta["tokens_per_image"])


def export_tiling(meta: dict) -> Optional[Tiling]:
    """The export's `Tiling` from nemo_neva_export.json's `image_tiling` (None for an untiled model); the
    recorded max_tiles / tokens_per_tile / max_tokens_per_image must be the ones the geometry gives."""
    t = meta.get("image_tiling")
    if not t:
        return None
    tiling = Tiling(check_pinpoints(t["grid_pinpoints"], int(t["tile"])), int(t["tile"]), int(t["side"]))
    derived = {"max_tiles": tiling.max_tiles, "tokens_per_tile": tiling.base_tokens,
               "max_tokens_per_image": tiling.max_tokens}
    recorded = {**{k: t.get(k) for k in ("max_tiles", "tokens_per_tile")},
                "max_tokens_per_image": meta.get("max_tokens_per_image")}
    bad = [f"{k}={recorded[k]} (the pinpoints give {v})" for k, v in derived.items() if recorded[k] != v]
    if bad:
        raise ValueError(f"nemo_neva_export.json image_tiling does not fit its own geometry: {', '.join(bad)}; "
                         "export the .nemo again")
    return tiling


def load_image_newline(export_dir: str, meta: dict) -> torch.Tensor:
    """The learned row-end embedding [hidden] a tiled export writes (vision/image_newline.safetensors)."""
    from safetensors.torch import load_file

    path = os.path.join(export_dir, meta["image_tiling"]["image_newline"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: a tiled export needs its image_newline")
    newline = load_file(path)[NEWLINE_KEY]
    if tuple(newline.shape) != (int(meta["hidden_size"]),):
        raise ValueError(f"{path}: image_newline has shape {tuple(newline.shape)}, expected [{meta['hidden_size']}]")
    return newline


def tiled_prompt_table(tile_features: torch.Tensor, sizes: Sequence[Sequence[int]], tiling: Tiling,
                       newline: torch.Tensor) -> torch.Tensor:
    """The vision engine's features of every image's own tiles ([sum of tiling.tiles, tokens_per_tile, hidden],
    images in order, as `image_tiles` gives them) + the images' (height, width) -> the prompt table
    [sum of tiling.tokens, hidden]: each image packed as the .nemo model packs it."""
    want = sum(tiling.tiles(int(h), int(w)) for h, w in sizes)
    if tile_features.dim() != 3 or tile_features.shape[0] != want or tile_features.shape[1] != tiling.base_tokens:
        raise ValueError(f"tile features must be [{want}, {tiling.base_tokens}, hidden] for images of sizes "
                         f"{[tuple(map(int, s)) for s in sizes]}, got {tuple(tile_features.shape)}")
    return pack_images(tile_features, sizes, tiling, newline.to(tile_features.device))
