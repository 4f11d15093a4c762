"""TensorRT-LLM export of a tiled (anyres) model: the exported vision ONNX on onnxruntime + the exported geometry,
newline and processor rebuild, image by image, the embeddings our NevaModule splices in for non-square images of
different sizes; the engine build is sized for the largest grid. (Serving the export: tests/serving/
test_triton_trtllm_tiling.py.)"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from nemo_neva.export.trtllm import export_neva_to_trtllm, export_pixels
from nemo_neva.export.trtllm_build import default_max_input_len, llm_build_command, vision_batch
from nemo_neva.export.trtllm_prompt import (export_tiling, image_tiles, load_image_newline, max_tokens_per_image,
                                            tiled_prompt_table)
from tests.export.trtllm_helpers import TILED, OnnxVision, random_image, tiny_neva

# Non-square, different sizes: two 3-tile grids (wide 1x3, tall 3x1) and a 2x2 grid, all unpadded differently.
SIZES = [(40, 90), (90, 40), (70, 100)]
# onnxruntime vs torch, both fp32 and the same ops, but other kernels (MatMul blocking, fused Softmax /
# LayerNorm) sum in another order: ~1e-6 on these O(1) features (tests/export/test_onnx_vision.py uses the same
# bound). A packing error (a row moved, a tile swapped, a newline misplaced) changes rows by O(1).
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_neva("llama", seed=7, **TILED)
    out = str(tmp_path_factory.mktemp("tiled_trt") / "out")
    meta = export_neva_to_trtllm(model, out, dtype="float32")
    return model, out, meta


def test_the_export_records_the_geometry_newline_and_tile_processor(exported):
    model, out, meta = exported
    tiling = model.tiling
    assert meta == json.load(open(os.path.join(out, "nemo_neva_export.json")))
    assert meta["tokens_per_image"] is None  # by image size
    assert meta["image_tiling"] == {"grid_pinpoints": [list(p) for p in tiling.pinpoints], "tile": tiling.tile,
                                    "side": tiling.side, "tokens_per_tile": tiling.side ** 2,
                                    "max_tiles": tiling.max_tiles, "image_newline": "vision/image_newline.safetensors"}
    assert export_tiling(meta) == tiling
    newline = load_file(os.path.join(out, "vision", "image_newline.safetensors"))["image_newline"]
    assert torch.equal(newline, model.model.image_newline.detach())
    cfg = json.load(open(os.path.join(out, "vision", "preprocessor_config.json")))
    assert cfg["image_processor_type"].startswith("LlavaNextImageProcessor")
    for k, (h, w) in enumerate(SIZES + [(32, 32), (17, 130)]):  # the export's pixels are the model's
        image = random_image(h, w, seed=k)
        assert torch.equal(export_pixels(out, image, meta)[0], model.preprocess_images(image)), (h, w)


def test_max_tokens_per_image_bounds_every_size(exported):
    """Sizes the engine's prompt table: no image takes more, and an image of a pinpoint's size takes exactly that."""
    model, _, meta = exported
    counts = [model.tiling.tokens(h, w) for h in range(1, 200, 3) for w in range(1, 200, 3)]
    assert max(counts) <= meta["max_tokens_per_image"] == max_tokens_per_image(meta)
    assert meta["max_tokens_per_image"] in [model.tiling.tokens(h, w) for h, w in model.tiling.pinpoints]


def _spliced_image_embeddings(model, images):
    """What NevaModule puts at the placeholder positions of one prompt holding `images` (the decoder's input;
    a RoPE model adds no position embedding to it)."""
    counts = [model.image_token_count(im) for im in images]
    tokens = torch.full((1, sum(counts) + 2 * len(images) + 2), 30, dtype=torch.long)
    pos = 1
    for c in counts:
        tokens[0, pos:pos + c] = model.image_token_id
        pos += c + 2
    captured = {}
    decoder = model.model.language_model.decoder
    hook = decoder.register_forward_pre_hook(
        lambda m, a, kw: captured.__setitem__("x", kw["hidden_states"].detach().transpose(0, 1).clone()),
        with_kwargs=True)
    try:
        with torch.no_grad():
            model.model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), images=model.preprocess_images(images),
                        image_sizes=torch.tensor([(im.height, im.width) for im in images]))
    finally:
        hook.remove()
    return captured["x"][tokens == model.image_token_id], counts


def test_prompt_table_from_onnxruntime_equals_the_spliced_embeddings(exported):
    model, out, meta = exported
    images = [random_image(h, w, seed=10 + k) for k, (h, w) in enumerate(SIZES)]
    ours, counts = _spliced_image_embeddings(model, images)
    assert len({model.tiling.grid(h, w) for h, w in SIZES}) == 3 and len(set(counts)) == 3

    tiling, newline = export_tiling(meta), load_image_newline(out, meta)  # from the export folder alone
    vision = OnnxVision(out, meta)
    pixels = torch.cat([export_pixels(out, im, meta) for im in images])  # [3, max_tiles, 3, t, t]
    table = tiled_prompt_table(vision(image_tiles(pixels, SIZES, tiling)), SIZES, tiling, newline)
    assert vision.calls == [(sum(tiling.tiles(h, w) for h, w in SIZES), 3, tiling.tile, tiling.tile)]
    assert table.shape == (sum(counts), meta["hidden_size"]) == ours.shape
    torch.testing.assert_close(table, ours, **TOL)
    # each image's rows in order: base grid, then every kept row + the newline, copied exactly (no arithmetic)
    start = 0
    for (h, w), count in zip(SIZES, counts):
        top, bottom, left, right = tiling.window(h, w)
        ends = start + tiling.base_tokens + (right - left) + torch.arange(bottom - top) * (right - left + 1)
        assert torch.equal(table[ends], newline.expand(len(ends), -1))
        assert torch.equal(ours[ends], newline.expand(len(ends), -1))
        start += count


def test_bad_tile_features_and_a_tampered_geometry_are_refused(exported):
    _, out, meta = exported
    tiling, newline = export_tiling(meta), load_image_newline(out, meta)
    with pytest.raises(ValueError, match=r"tile features must be \[8, 16, hidden\]"):
        tiled_prompt_table(torch.zeros(7, 16, 64), SIZES[:2], tiling, newline)
    bad = {**meta, "image_tiling": {**meta["image_tiling"], "max_tiles": 9}}
    with pytest.raises(ValueError, match=r"max_tiles=9 \(the pinpoints give 5\); export the .nemo again"):
        export_tiling(bad)


def test_the_engine_build_is_sized_for_the_largest_grid(exported):
    _, out, meta = exported
    cmd = llm_build_command(out, meta, max_batch_size=2, max_input_len=600, max_output_len=32,
                            max_images_per_request=2)
    args = dict(zip(cmd, cmd[1:]))
    assert args["--max_prompt_embedding_table_size"] == str(2 * 2 * meta["max_tokens_per_image"])
    assert vision_batch(meta, 2, 2) == 2 * 2 * meta["image_tiling"]["max_tiles"]  # every tile of every image
    assert default_max_input_len(meta, 20) == 20 * meta["max_tokens_per_image"] + 512
    assert default_max_input_len({"tokens_per_image": 576}, 1) == 1024  # untiled: as before


def test_fp8_calibration_runs_tiled_samples_with_their_image_sizes(exported):
    """The demo's LLaVA JSON encoded as training encodes it for this model: tiles + each image's size."""
    from nemo_neva.export import trtllm_fp8 as fp8
    from tests.model.helpers import ROOT

    model = exported[0]
    demo = os.path.join(ROOT, "data", "shapes_demo")
    batches = list(fp8.calibration_batches(model, os.path.join(demo, "stage1_captions.json"),
                                           os.path.join(demo, "images"), num_samples=2))
    assert all(b["images"].dim() == 5 and b["image_sizes"].shape == (b["images"].shape[0], 2) for b in batches)
    amax = fp8.calibrate_activation_amax(model, batches)
    want = {f"transformer.layers.{i}.{n}" for i in range(model.cfg.num_layers) for n in fp8.QUANTIZED}
    assert set(amax) == want and all(float(v) > 0 for v in amax.values())


@pytest.mark.parametrize("tiled", [True, False])
def test_the_gpu_check_inputs_on_cpu(exported, tiled, tmp_path):
    """scripts/trtllm_gpu_check.sh's steps 1-2 (`trtllm_check.engine_inputs`) with onnxruntime for the vision engine,
    and the reference forward of the rank files for the LLM engine: what it compares must agree here. A tiled
    export is checked on two images of different sizes."""
    from PIL import Image

    from nemo_neva.export.trtllm_check import engine_inputs
    from tests.export import trtllm_reference as ref
    from tests.model.helpers import ROOT

    model, out, meta = exported
    if not tiled:
        model = tiny_neva("llama", seed=7)
        out = str(tmp_path / "plain")
        meta = export_neva_to_trtllm(model, out, dtype="float32")
    image = Image.open(os.path.join(ROOT, "data", "shapes_demo", "images", "eval_00000.png")).convert("RGB")
    got = engine_inputs(model, out, meta, image, "What is in the image?", OnnxVision(out, meta))
    assert len(got["images"]) == (2 if tiled else 1) and got["vis_err"] < 1e-5  # as TOL above
    if tiled:
        assert got["images"][0].size != got["images"][1].size
        assert got["vision_inputs"] == sum(model.tiling.tiles(im.height, im.width) for im in got["images"])
    cfg, ranks = ref.load_checkpoint(os.path.join(out, "llm"))
    logits = ref.forward(cfg, ranks, got["fake"].unsqueeze(0), got["table"])[0, -1]
    # The rank files alone match the model within 2e-5 (test_trtllm_script.py); the ONNX features' ~1e-6
    # through the LM adds little: 5e-5. A table row out of place moves these O(1) logits by > 1e-2.
    torch.testing.assert_close(logits, got["ref_logits"], atol=5e-5, rtol=0)
