"""High-resolution tiling ("anyres", LLaVA-NeXT): the geometry of one image and its placeholder count.

`model.mm_cfg.image_tiling.enabled` turns it on. An image of (height, width) is fitted to the best of the
`grid_pinpoints` resolutions (the one keeping most of its pixels, then wasting least), resized to fit it with
its aspect ratio kept, padded to it and cut into tower-sized tiles; a base thumbnail of the whole image,
stretched to one tile, comes first. The tower and projector turn every tile into a `side x side` grid of
features. The tiles' grids are joined into one big grid, the rows / columns that only show padding are cut
away again ("unpadding", by the original aspect ratio) and a learned `image_newline` embedding closes every
row of it. One image then becomes

    base tokens (side * side) + kept_rows * (kept_cols + 1)

placeholder tokens, in the order transformers' `LlavaNextForConditionalGeneration` builds them (base first,
then the grid row by row, each row ending with the newline). `Tiling.tokens` is the one count every path
uses: training data, packing, generation and export.

Pixels come from transformers' own `LlavaNextImageProcessor` (`processor_for`), so the resize, padding, tile
order and thumbnail are its; a preprocessed image is `[max_tiles, 3, tile, tile]` (zero tiles after its own,
so every image of a model has one shape and batches stack) plus its original (height, width).

Pure geometry: nothing here imports the network (`nemo_neva.modules` builds the features with it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

# transformers' LlavaNextImageProcessor default, for a 336-pixel tower: 1x2, 2x1, 2x2, 3x1, 1x3 tiles.
HF_DEFAULT_PINPOINTS_TILES = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) of `pinpoints` an image is fitted to: the one whose aspect-preserving downscale keeps
    most of the image's pixels; among equals, the one wasting the fewest pixels; among those, the first."""
    best, best_kept, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = pw * ph - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (int(ph), int(pw)), kept, waste
    return best


def kept_window(height: int, width: int, rows: int, cols: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a `rows x cols` feature grid of a padded image that still shows the
    original image of (height, width): the padding split evenly on both sides of the long dimension.
    Rounded as transformers rounds it (to 7 decimals, then down), so the counts agree exactly."""
    if width / height > cols / rows:  # wider than the grid: padding above and below
        pad = (rows - int(round(height * (cols / width), 7))) // 2
        return pad, rows - pad, 0, cols
    pad = (cols - int(round(width * (rows / height), 7))) // 2
    return 0, rows, pad, cols - pad


@dataclass(frozen=True)
class Tiling:
    """The tiling of one model: `pinpoints` ((height, width) pixels, multiples of `tile`), `tile` (the tower's
    input side in pixels) and `side` (features per tile side after the projector)."""

    pinpoints: tuple[tuple[int, int], ...]
    tile: int
    side: int

    @property
    def base_tokens(self) -> int:
        return self.side * self.side

    @property
    def max_tiles(self) -> int:
        """Tiles of the largest grid + the base thumbnail: dim 1 of every preprocessed image."""
        return max(h // self.tile * (w // self.tile) for h, w in self.pinpoints) + 1

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(tile rows, tile columns) an image of (height, width) is cut into."""
        h, w = best_resolution(height, width, self.pinpoints)
        return h // self.tile, w // self.tile

    def tiles(self, height: int, width: int) -> int:
        """Tower inputs one image takes: its grid's tiles + the base thumbnail."""
        rows, cols = self.grid(height, width)
        return rows * cols + 1

    def window(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the joined feature grid kept after unpadding."""
        rows, cols = self.grid(height, width)
        return kept_window(height, width, rows * self.side, cols * self.side)

    def tokens(self, height: int, width: int) -> int:
        """Placeholder tokens of one image of (height, width): the base grid, then every kept row of the tiled
        grid plus its newline."""
        check_size(height, width)
        top, bottom, left, right = self.window(height, width)
        return self.base_tokens + (bottom - top) * (right - left + 1)

    @property
    def max_tokens(self) -> int:
        """The most placeholder tokens any image can take (sizes a TensorRT-LLM prompt table): an image of a
        pinpoint's own size fits that grid exactly, nothing is unpadded, and every other image keeps at most
        the whole grid of the pinpoint it is fitted to."""
        return max(self.tokens(h, w) for h, w in self.pinpoints)


def check_size(height, width) -> None:
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"image size {height}x{width}: both sides must be >= 1 pixel")


def check_pinpoints(pinpoints, tile: int) -> tuple[tuple[int, int], ...]:
    """`grid_pinpoints` as a tuple of (height, width); each a positive multiple of the tower's `tile` pixels."""
    if not pinpoints:
        raise ValueError("model.mm_cfg.image_tiling.grid_pinpoints must list at least one [height, width]")
    out = []
    for p in pinpoints:
        if len(p) != 2 or any(int(v) != v or int(v) < tile or int(v) % tile for v in p):
            raise ValueError(f"model.mm_cfg.image_tiling.grid_pinpoints entry {list(p)} must be [height, width] in "
                             f"pixels, each a positive multiple of the vision tower's image_size ({tile})")
        out.append((int(p[0]), int(p[1])))
    return tuple(out)


def tiling_from_cfg(tiling_cfg, vision_config, features_per_tile: int) -> Optional[Tiling]:
    """The model's `Tiling` from `model.mm_cfg.image_tiling` (None when it is off or absent).

    `vision_config`: the tower's HF config (its `image_size` is the tile); `features_per_tile`: image tokens
    one tile becomes after the tower and projector (a square grid: tiling needs the CLS token dropped).
    `grid_pinpoints` null: transformers' default grids (1x2, 2x1, 2x2, 3x1, 1x3 tiles) at this tower's size.
    """
    if tiling_cfg is None or not tiling_cfg.get("enabled", False):
        return None
    tile = int(vision_config.image_size)
    side = int(round(features_per_tile ** 0.5))
    if side * side != features_per_tile:
        raise ValueError(f"model.mm_cfg.image_tiling needs a square grid of features per tile, but one tile gives "
                         f"{features_per_tile} (is the CLS token kept? set vision_encoder.drop_cls=true)")
    pinpoints = tiling_cfg.get("grid_pinpoints")
    if pinpoints is None:
        pinpoints = [[r * tile, c * tile] for r, c in HF_DEFAULT_PINPOINTS_TILES]
    return Tiling(check_pinpoints([list(p) for p in pinpoints], tile), tile, side)


# ------------------------------------------------------------------------------------------- pixels
def processor_for(tower_processor, tiling: Tiling):
    """transformers' LlavaNextImageProcessor with the tower processor's settings (size, crop, mean, std,
    resample, rescale) and the model's pinpoints, of the same backend (PIL or torchvision) as the tower's."""
    import transformers

    suffix = "Pil" if type(tower_processor).__name__.endswith("Pil") else ""
    cls = getattr(transformers, "LlavaNextImageProcessor" + suffix)
    settings = {k: v for k, v in tower_processor.to_dict().items()
                if k in ("size", "crop_size", "do_center_crop", "image_mean", "image_std", "resample",
                         "rescale_factor", "do_rescale", "do_normalize", "do_resize", "do_convert_rgb")}
    settings.setdefault("do_center_crop", False)  # SigLIP's processor has no crop: LLaVA-NeXT's default would crop
    if not settings.get("crop_size"):
        settings["crop_size"] = {"height": tiling.tile, "width": tiling.tile}
    return cls(**settings, image_grid_pinpoints=[list(p) for p in tiling.pinpoints], do_pad=True)


def image_size_of(image) -> tuple[int, int]:
    """(height, width) of a PIL image."""
    return image.height, image.width


def preprocess_tiled(image, processor, tiling: Tiling) -> torch.Tensor:
    """One PIL image -> [max_tiles, 3, tile, tile]: the base thumbnail, then the tiles row by row (transformers'
    LlavaNextImageProcessor makes them), then zero tiles up to `max_tiles`."""
    out = processor(images=image, return_tensors="pt")
    pixels, (h, w) = out["pixel_values"][0].float(), out["image_sizes"][0].tolist()
    n = tiling.tiles(h, w)
    if pixels.shape[0] != n or (h, w) != image_size_of(image) or pixels.shape[-1] != tiling.tile:
        raise ValueError(f"image processor made {pixels.shape[0]} tiles of {pixels.shape[-1]} pixels for a {h}x{w} "
                         f"image; the tiling expects {n} of {tiling.tile}")
    return torch.cat([pixels, pixels.new_zeros(tiling.max_tiles - n, *pixels.shape[1:])])
