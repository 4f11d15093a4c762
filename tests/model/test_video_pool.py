"""Per-frame video token pooling (`model.mm_cfg.video.pool`, nemo_neva/modules/frame_pool.py).

Oracle: transformers' own `LlavaNextVideoPooler` (LLaVA-NeXT-Video's spatial pooling) on the same features.
Then the tiny model: a frame costs the pooled count in the data, the network, packing, the micro-batch split
and generation, images in the same sample keep their full count, and the pooled features are the tower's
features pooled then projected (the splice puts exactly them at the frames' placeholders)."""

import pytest
import torch
from transformers import CLIPVisionConfig, LlavaNextVideoConfig, LlamaConfig
from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoPooler

from nemo_neva import MegatronNevaModel, build_model
from nemo_neva.data.collate import NevaCollator
from nemo_neva.data.packing import PackedCollator
from nemo_neva.data.video_io import Video
from nemo_neva.modules.frame_pool import FramePool, frame_pool_from_cfg
from nemo_neva.training.megatron_step import split_microbatches
from tests.model.helpers import tiny_model_cfg, video_model
from tests.optional import require

av = require("av")
FRAMES = 3
# one sample's loss computed alone vs in a batch / packed row: fp32 sums over different row layouts differ in
# the last bits only (measured <= 3e-7 relative); 1e-5 leaves room for other CPUs' reduction orders
REL = 1e-5


@pytest.mark.parametrize("mode", ["average", "max"])
@pytest.mark.parametrize("side,stride", [(4, 2), (6, 2), (5, 2), (6, 3)])
def test_pooling_equals_transformers_llava_next_video_pooler(mode, side, stride):
    vision = CLIPVisionConfig(hidden_size=16, image_size=side * 4, patch_size=4, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=32)
    hf = LlavaNextVideoPooler(LlavaNextVideoConfig(vision_config=vision, text_config=LlamaConfig(),
                                                   spatial_pool_mode=mode, spatial_pool_stride=stride))
    feats = torch.randn(3, side * side, 16, generator=torch.Generator().manual_seed(side))
    ours = FramePool(stride, mode)(feats)
    assert ours.shape == (3, FramePool(stride, mode).tokens(side * side), 16) == (3, (side // stride) ** 2, 16)
    torch.testing.assert_close(ours, hf(feats), rtol=0, atol=0)  # the same torch pooling kernel: bit-identical


@pytest.mark.parametrize("spec,message", [
    ("2x3", "expected 'NxN'"), ("1x1", "expected 'NxN' with N >= 2"), ("two", "expected 'NxN'"),
    ("8x8", "larger than the tower's feature grid"),
])
def test_bad_pool_specs_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        frame_pool_from_cfg({"video": {"pool": spec}}, 16)


def test_pool_mode_and_cls_are_checked():
    with pytest.raises(ValueError, match="pool_mode='mean'"):
        frame_pool_from_cfg({"video": {"pool": "2x2", "pool_mode": "mean"}}, 16)
    with pytest.raises(ValueError, match="drop_cls=true"):
        frame_pool_from_cfg({"video": {"pool": "2x2"}}, 17)  # 16 patches + CLS: not a square grid
    assert frame_pool_from_cfg({"video": {"pool": None}}, 16) is None and frame_pool_from_cfg({}, 16) is None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pool")
    model, cfg = video_model(tmp, "<image> then <video>: same?", FRAMES, **{"mm_cfg.video.pool": "2x2"})
    ds = model.build_dataset(cfg.data)
    return model, cfg, [ds[i] for i in range(len(ds))], tmp


def _placeholder_runs(ids, token):
    runs, n = [], 0
    for t in ids.tolist() + [None]:
        if t == token:
            n += 1
        elif n:
            runs, n = runs + [n], 0
    return runs


def test_frames_cost_the_pooled_count_and_images_their_full_count(setup):
    model, _, items, _ = setup
    P, F = model.tokens_per_image, model.tokens_per_frame
    assert (P, F) == (16, 4)  # the tiny tower: 32 px / 8 px patches = 4x4 features, pooled 2x2 -> 2x2
    with torch.no_grad():  # the network's features of an image and a pooled frame: the counts it was given
        feats = model.model.encode_media(torch.zeros(2, 3, 32, 32), torch.tensor([False, True]))
    assert feats.shape[0] == P + F
    runs = [_placeholder_runs(it["input_ids"], model.image_token_id) for it in items]
    assert runs == [[F * FRAMES], [P], [], [P, F * FRAMES]]  # a video's frames' runs are back to back
    assert items[0]["video_frames"].tolist() == [True] * FRAMES and "video_frames" not in items[1]
    assert items[3]["video_frames"].tolist() == [False] + [True] * FRAMES


def _expected_spliced(model, item):
    """The embeddings the frames' and images' placeholders must get: the tower's features, pooled 2x2 for
    frames (torch's avg_pool2d on the 4x4 grid), then the projector."""
    m = model.model
    with torch.no_grad():
        feats = m.vision_tower(item["images"])
        out = []
        for f, is_frame in zip(feats, item["video_frames"].tolist()):
            if is_frame:
                grid = f.reshape(4, 4, -1).permute(2, 0, 1)
                f = torch.nn.functional.avg_pool2d(grid[None], 2)[0].flatten(1).T
            out.append(m.projector(f))
    return torch.cat(out)


def test_the_pooled_features_are_spliced_at_the_frames_placeholders(setup):
    model, _, items, _ = setup
    item = items[3]
    captured = {}
    gpt = model.model.language_model

    def capture(module, args, kwargs):  # the decoder's input: the embeddings with the features spliced in
        captured["hidden"] = kwargs["hidden_states"].detach().clone()

    hook = gpt.decoder.register_forward_pre_hook(capture, with_kwargs=True)
    batch = NevaCollator(model.tokenizer.pad_token_id)([item])
    model.eval()
    try:
        with torch.no_grad():
            model.loss_from_batch(batch)
    finally:
        hook.remove()
    at = batch["tokens"][0] == model.image_token_id
    expected = _expected_spliced(model, item)
    if gpt.embedding.add_position_embedding:  # a feature gets its position's embedding, as the word it replaces
        with torch.no_grad():
            expected = expected + gpt.embedding.position_embeddings(batch["position_ids"][0][at])
    # the same fp32 ops on the same inputs, batched differently (4 images in one tower / projector call vs one at
    # a time): only GEMM blocking can differ, far below 1e-6 for these O(1) embeddings of width 64
    torch.testing.assert_close(captured["hidden"][:, 0][at], expected, rtol=0, atol=1e-6)

def _loss(model, batch):
    with torch.no_grad():
        return float(model.loss_from_batch(batch)[0])


def test_batched_split_and_packed_rows_give_each_samples_own_loss(setup):
    model, _, items, _ = setup
    model.eval()
    pad = model.tokenizer.pad_token_id
    collate = NevaCollator(pad)
    alone = [_loss(model, collate([it])) for it in items]
    batch = collate(items)
    assert batch["video_frames"].tolist() == [True] * FRAMES + [False] + [False] + [True] * FRAMES
    # micro-batches of 2 rows: each keeps its own images' flags
    for k, mb in enumerate(split_microbatches(batch, 2)):
        rows = items[2 * k:2 * k + 2]
        want = torch.cat([it.get("video_frames", torch.zeros(it["images"].shape[0], dtype=torch.bool))
                          for it in rows if it["images"] is not None])
        assert mb["video_frames"].tolist() == want.tolist()
    # token-weighted mean of the per-sample losses = the batch loss
    n = [float(collate([it])["loss_mask"].sum()) for it in items]
    assert _loss(model, batch) == pytest.approx(sum(a * b for a, b in zip(alone, n)) / sum(n), rel=REL)
    packed = PackedCollator(pad)([[items[0], items[3]], [items[1], items[2]]])
    assert packed["video_frames"].tolist() == [True] * FRAMES + [False] + [True] * FRAMES + [False]
    want = (alone[0] * n[0] + alone[3] * n[3] + alone[1] * n[1] + alone[2] * n[2]) / sum(n)
    assert _loss(model, packed) == pytest.approx(want, rel=REL)


def test_missing_or_wrong_frame_flags_are_one_line_errors(setup):
    from nemo_neva.modules.neva_module import ImageTokenMismatch

    model, _, items, _ = setup
    batch = NevaCollator(model.tokenizer.pad_token_id)([items[0]])
    with pytest.raises(ImageTokenMismatch, match=r"sample 0 of the batch has 12 image placeholder tokens but "
                                                 r"3 image\(s\) x 16 tokens per image \(4 per pooled video frame\)"):
        model.loss_from_batch(dict(batch, video_frames=None))
    with pytest.raises(ImageTokenMismatch, match="video_frames has 2 entries for 3 image"):
        model.loss_from_batch(dict(batch, video_frames=batch["video_frames"][:2]))


def test_training_step_and_generation_with_pooled_frames(setup):
    model, _, items, tmp = setup
    model.train()
    step = model.train_on_batch(NevaCollator(model.tokenizer.pad_token_id)(items), model.configure_optimizers())
    assert torch.isfinite(step)
    from nemo_neva.data.video_io import open_video, VideoSettings
    from nemo_neva.inference.generate import encode_prompt, generate_tokens

    video = open_video(str(tmp / "clip.mp4"), VideoSettings(FRAMES))
    image = items[1]["images"][0]
    prompt = "USER: <image> and <video> ASSISTANT:"
    ids = encode_prompt(model, prompt, [image, video])
    assert _placeholder_runs(ids, model.image_token_id) == [16, 4 * FRAMES]
    cached = generate_tokens(model, [[image, video]], [prompt], max_new_tokens=6)
    recomputed = generate_tokens(model, [[image, video]], [prompt], max_new_tokens=6, use_cache=False)
    assert cached == recomputed and len(cached[0]) > 0
    # the frames are pooled at generation too: unpooled frames would be 3 x 16 placeholders and refused
    batched = generate_tokens(model, [None, [image, video], [image]], ["USER: hi ASSISTANT:", prompt,
                                                                      "USER: <image> ASSISTANT:"], max_new_tokens=6)
    assert batched[1] == cached[0]


def test_pool_survives_save_and_restore_and_is_refused_with_tiling(setup, tmp_path):
    model, cfg, items, _ = setup
    path = str(tmp_path / "pooled.nemo")
    model.save_to(path)
    restored = MegatronNevaModel.restore_from(path)
    assert restored.frame_pool == FramePool(2) and restored.tokens_per_frame == 4
    # finetuning (conf/neva_finetune.yaml): its null video keys keep the .nemo's pooling; NxN switches it on
    from omegaconf import OmegaConf

    from nemo_neva.models.finetune_config import finetune_config

    keep = OmegaConf.create({"mm_cfg": {"video": {"pool": None, "pool_mode": None}}})
    assert finetune_config(path, keep).mm_cfg.video == {"pool": "2x2", "pool_mode": "average"}
    plain = str(tmp_path / "plain.nemo")
    build_model(tiny_model_cfg()).save_to(plain)
    on = OmegaConf.create({"mm_cfg": {"video": {"pool": "3x3", "pool_mode": "max"}}})
    assert finetune_config(plain, on).mm_cfg.video == {"pool": "3x3", "pool_mode": "max"}
    bad = tiny_model_cfg(**{"mm_cfg.video.pool": "2x2", "mm_cfg.image_tiling.enabled": True})
    with pytest.raises(ValueError, match="model.mm_cfg.video.pool does not apply with model.mm_cfg.image_tiling"):
        build_model(bad)


def test_max_image_tokens_per_sample_is_a_counted_skip_naming_the_count(setup):
    model, cfg, _, _ = setup
    cfg = cfg.copy()
    cfg.data.max_image_tokens_per_sample = 16  # "image" (16) fits; "video" (3 x 4 = 12) fits; "both" (28) does not
    ds = model.build_dataset(cfg.data)
    assert dict(ds.skip_counts) == {"too_many_image_tokens": 1}
    assert [r["id"] for r in ds.records] == ["video", "image", "text"]
    cfg.data.max_image_tokens_per_sample = 0
    with pytest.raises(ValueError, match="max_image_tokens_per_sample must be >= 1 or null, got 0"):
        model.build_dataset(cfg.data)
