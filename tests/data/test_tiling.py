"""anyres tiling geometry against transformers: the best grid, tile counts, the placeholder count its
LlavaNextProcessor inserts, and the pixels of its LlavaNextImageProcessor (they are ours by construction)."""
import random

import pytest
import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from nemo_neva.modules.tiling import Tiling, best_resolution, preprocess_tiled, processor_for, tiling_from_cfg
from nemo_neva.modules.vision import CLIPImageProcessor, SiglipImageProcessor

from neva_data_helpers import DEMO_TOKENIZER

TILE, PATCH = 32, 8
PINPOINT_SETS = {
    "hf_default": [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]],
    "up_to_3x3": [[32 * r, 32 * c] for r in range(1, 4) for c in range(1, 4)],
    "wide_only": [[32, 128], [64, 64]],
}


def _sizes(n=40, seed=0):
    """Random (height, width) pairs: near-square, wide, tall, tiny and extreme strips."""
    rnd = random.Random(seed)
    out = [(32, 32), (1, 1), (7, 300), (300, 7), (33, 97), (64, 32), (500, 499), (2, 1000)]
    while len(out) < n:
        out.append((rnd.randint(1, 400), rnd.randint(1, 400)))
    return out


@pytest.mark.parametrize("name", sorted(PINPOINT_SETS))
def test_grid_and_tile_counts_are_transformers(name):
    pins = PINPOINT_SETS[name]
    tiling = Tiling(tuple(map(tuple, pins)), TILE, TILE // PATCH)
    for h, w in _sizes():
        assert best_resolution(h, w, pins) == tuple(select_best_resolution((h, w), pins)), (h, w)
        assert tiling.tiles(h, w) == image_size_to_num_patches((h, w), pins, TILE), (h, w)


def _hf_processor(pins, strategy="default", extra=1):
    from transformers import AutoTokenizer, LlavaNextImageProcessorPil, LlavaNextProcessor

    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                                 image_grid_pinpoints=pins)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(DEMO_TOKENIZER),
                              patch_size=PATCH, vision_feature_select_strategy=strategy,
                              num_additional_image_tokens=extra)


@pytest.mark.parametrize("name", sorted(PINPOINT_SETS))
def test_placeholder_count_equals_the_image_tokens_hf_processor_inserts(name):
    pins = PINPOINT_SETS[name]
    hf = _hf_processor(pins)
    tiling = Tiling(tuple(map(tuple, pins)), TILE, TILE // PATCH)
    image_id = hf.tokenizer.convert_tokens_to_ids("<image>")
    counts = set()
    for h, w in _sizes(24, seed=1):
        ids = hf(images=Image.new("RGB", (w, h)), text="<image>\nhi", return_tensors="pt")["input_ids"][0]
        theirs = int((ids == image_id).sum())
        assert tiling.tokens(h, w) == theirs, (h, w)
        counts.add(theirs)
    assert len(counts) > 3  # the count really varies with the size


def test_pixels_are_the_hf_processors_with_zero_tiles_after(tmp_path):
    pins = PINPOINT_SETS["up_to_3x3"]
    tiling = tiling_from_cfg({"enabled": True, "grid_pinpoints": pins},
                             type("V", (), {"image_size": TILE})(), (TILE // PATCH) ** 2)
    tower = CLIPImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE})
    ours = processor_for(tower, tiling)
    hf = _hf_processor(pins).image_processor
    g = torch.Generator().manual_seed(0)
    for h, w in [(40, 90), (90, 40), (32, 32), (70, 71)]:
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        img = Image.fromarray(arr)
        pixels = preprocess_tiled(img, ours, tiling)
        ref = hf(images=img, return_tensors="pt")
        n = tiling.tiles(h, w)
        assert pixels.shape == (tiling.max_tiles, 3, TILE, TILE) == (10, 3, 32, 32)
        assert ref["image_sizes"][0].tolist() == [h, w]
        assert torch.equal(pixels[:n], ref["pixel_values"][0].float())
        assert not pixels[n:].any()


def test_siglip_tower_makes_an_uncropped_tiling_processor():
    tiling = Tiling(((32, 64),), TILE, 4)
    proc = processor_for(SiglipImageProcessor(size={"height": TILE, "width": TILE}), tiling)
    assert not proc.do_center_crop and type(proc).__name__ == "LlavaNextImageProcessorPil"
    pixels = preprocess_tiled(Image.new("RGB", (64, 32), (255, 0, 0)), proc, tiling)
    assert pixels.shape == (3, 3, TILE, TILE)


def test_config_errors_are_one_line():
    vision = type("V", (), {"image_size": TILE})()
    assert tiling_from_cfg(None, vision, 16) is None and tiling_from_cfg({"enabled": False}, vision, 16) is None
    with pytest.raises(ValueError, match="multiple of the vision tower's image_size"):
        tiling_from_cfg({"enabled": True, "grid_pinpoints": [[32, 48]]}, vision, 16)
    with pytest.raises(ValueError, match="at least one"):
        tiling_from_cfg({"enabled": True, "grid_pinpoints": []}, vision, 16)
    with pytest.raises(ValueError, match="CLS token kept"):
        tiling_from_cfg({"enabled": True}, vision, 17)
    default = tiling_from_cfg({"enabled": True, "grid_pinpoints": None}, vision, 16)
    assert default.pinpoints == tuple(map(tuple, PINPOINT_SETS["hf_default"])) and default.max_tiles == 5
