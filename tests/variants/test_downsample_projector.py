"""mlp_downsample projector: 2x2 patch merge -> LayerNorm -> Linear -> GELU -> Linear, 4x fewer image tokens."""
import pytest
import torch

from nemo_neva import build_model
from nemo_neva.export.hf import UnsupportedCheckpoint, export_neva_to_hf
from nemo_neva.inference.generate import encode_prompt
from nemo_neva.modules.projector import PatchMerge2x2, build_projector
from tests.model.helpers import llama_overrides, tiny_model_cfg
from tests.variants.variant_helpers import assert_nemo_roundtrip, train_steps, variant_batch

DOWNSAMPLE = {"mm_cfg.mm_mlp_adapter_type": "mlp_downsample", "mm_cfg.llm.freeze": False}


def nemo1_merge(feats):
    """NeMo 1's DownSampleBlock order, re-stated patch by patch: the grid (row-major patches) zero-padded to an
    even side on the right / bottom; token t = (column block j, row block i) with t = j * blocks + i, holding the
    patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1) concatenated."""
    n, tokens, c = feats.shape
    side = round(tokens ** 0.5)
    even = side + side % 2
    grid = torch.zeros(n, even, even, c, dtype=feats.dtype)
    grid[:, :side, :side] = feats.reshape(n, side, side, c)
    blocks = even // 2
    out = []
    for j in range(blocks):
        for i in range(blocks):
            out.append(torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1],
                                  grid[:, 2 * i + 1, 2 * j], grid[:, 2 * i + 1, 2 * j + 1]], dim=-1))
    return torch.stack(out, dim=1)


def test_patch_merge_concatenates_each_2x2_block_in_nemo1_order():
    # 4x4 grid, feature = patch index: block (0,0) holds patches 0,1,4,5; the blocks go down the first two
    # columns first (NeMo 1's DownSampleBlock, checked side by side on this grid).
    feats = torch.arange(16.0).reshape(1, 16, 1)
    merged = PatchMerge2x2()(feats)
    assert merged.shape == (1, 4, 4)
    assert merged[0].tolist() == [[0, 1, 4, 5], [8, 9, 12, 13], [2, 3, 6, 7], [10, 11, 14, 15]]


def test_odd_grid_is_zero_padded():
    feats = torch.arange(1.0, 10.0).reshape(1, 9, 1)  # 3x3 grid
    merged = PatchMerge2x2()(feats)
    assert merged.shape == (1, 4, 4)
    assert merged[0].tolist() == [[1, 2, 4, 5], [7, 8, 0, 0], [3, 0, 6, 0], [9, 0, 0, 0]]


@pytest.mark.parametrize("side", [2, 3, 4, 5, 6, 24])
def test_patch_merge_equals_the_nemo1_restatement(side):
    feats = torch.randn(2, side * side, 3, generator=torch.Generator().manual_seed(side))
    assert torch.equal(PatchMerge2x2()(feats), nemo1_merge(feats))  # a pure permutation: bit for bit


def test_non_square_grid_is_refused():
    with pytest.raises(ValueError, match="square patch grid"):
        PatchMerge2x2()(torch.zeros(1, 17, 8))


def test_projector_shapes():
    proj = build_projector("mlp_downsample", 8, 32)
    assert [type(m).__name__ for m in proj] == ["PatchMerge2x2", "LayerNorm", "Linear", "GELU", "Linear"]
    assert proj[1].normalized_shape == (32,) and proj[2].in_features == 32
    assert proj(torch.randn(2, 16, 8)).shape == (2, 4, 32)


def test_placeholder_count_follows_projector_everywhere():
    model = build_model(tiny_model_cfg(**DOWNSAMPLE))
    assert model.tokens_per_image == 4  # 4x4 patches -> 2x2 (the network's features: below)
    prompt = encode_prompt(model, "<image>\nWhat is it?", True)
    assert int((prompt == model.image_token_id).sum()) == 4
    item = model.build_dataset(model.cfg.data)[0]
    assert int((item["input_ids"] == model.image_token_id).sum()) == 4
    feats = model.model.encode_images(variant_batch(model)["images"])
    assert feats.shape[1] == 4


def test_odd_grid_model_and_cls_refusal():
    model = build_model(tiny_model_cfg(**DOWNSAMPLE, **{"mm_cfg.vision_encoder.config.image_size": 40}))
    assert model.tokens_per_image == 9  # 5x5 patches, padded to 6x6 -> 3x3
    logits = model(**{k: v for k, v in variant_batch(model).items() if k in ("tokens", "position_ids", "images")})
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="drop_cls=true"):
        build_model(tiny_model_cfg(**DOWNSAMPLE, **{"mm_cfg.vision_encoder.drop_cls": False}))


def test_tiling_is_refused_naming_both_settings():
    """anyres unpads and ends rows of each tile's grid row by row; NeMo 1's merge orders blocks by column."""
    with pytest.raises(ValueError, match="mlp_downsample.*image_tiling"):
        build_model(tiny_model_cfg(**DOWNSAMPLE, **{"mm_cfg.image_tiling.enabled": True}))


def test_trains_roundtrips_and_refuses_hf_export(tmp_path):
    model = build_model(tiny_model_cfg(**DOWNSAMPLE, **llama_overrides()))
    before = {k: v.clone() for k, v in model.model.projector.state_dict().items()}
    train_steps(model)
    assert all(not torch.equal(before[k], v) for k, v in model.model.projector.state_dict().items())
    restored = assert_nemo_roundtrip(model, tmp_path / "down.nemo")
    with pytest.raises(UnsupportedCheckpoint, match="mlp_downsample"):
        export_neva_to_hf(restored, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
