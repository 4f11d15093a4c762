""""video" training samples (data/dataset.py + data/video_samples.py): a `<video>` tag becomes num_frames
placeholder runs, the item's images are exactly open_video's frames through the HF processor, mixed images and
videos keep tag order, bad videos are counted `video_<reason>` skips (strict: an error). Tar shards and Energon:
test_streamed_media.py. The videos are written here with PyAV (lossless)."""
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from neva_data_helpers import conv, json_dataset, placeholder_runs as runs, write_json
from nemo_neva.data.constants import IGNORE_INDEX, IMAGE_TOKEN
from nemo_neva.data.dataset import SampleError
from nemo_neva.data.image_io import preprocess
from nemo_neva.data.video_io import VideoSettings, open_video
from nemo_neva.data.video_samples import VideoLimits
from nemo_neva.data.video_writer import write_video
from tests.optional import require

av = require("av")

P = 5  # placeholder tokens per image / frame in these tests
F = 3  # frames sampled per video


def frames_of(n, seed, h=24, w=40):
    """n frames with random pixels (any two frames differ), so a wrong frame cannot match by accident."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture
def media(image_dir):
    write_video(image_dir / "a.mp4", frames_of(7, 0), container="mp4")
    write_video(image_dir / "b.mkv", frames_of(4, 1), container="matroska")
    data = (image_dir / "a.mp4").read_bytes()
    (image_dir / "broken.mp4").write_bytes(data[: len(data) // 3])  # header kept, packets cut off
    (image_dir / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(300))  # mp4 magic, no boxes
    return image_dir


def make(recs, tmp_path, folder, tok, proc, **kw):
    kw.setdefault("template", "vicuna_v1")
    kw.setdefault("seq_length", 160)
    kw.setdefault("tokens_per_image", P)
    kw.setdefault("video_settings", VideoSettings(F, "uniform"))
    return json_dataset(write_json(tmp_path / "d.json", recs), str(folder), tok, proc, **kw)


def video_pixels(path, proc, mode="square"):
    """The oracle: open_video's frames, each through the HF image processor."""
    frames = open_video(str(path), VideoSettings(F, "uniform")).frames
    return torch.stack([preprocess(f, proc, mode) for f in frames])


def test_video_sample_has_num_frames_runs_and_the_decoded_frames(tmp_path, media, tok, proc):
    rec = {"id": "v", "video": "a.mp4", "conversations": conv("<video>\nWhich way?", "left")}
    ds = make([rec], tmp_path, media, tok, proc, image_aspect_ratio="pad")
    item = ds[0]
    img_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    r = runs(item["input_ids"], img_id)
    assert len(r) == 1 and r[0][1] - r[0][0] == F * P  # the frames' runs back to back
    assert (item["labels"][r[0][0]:r[0][1]] == IGNORE_INDEX).all()
    assert ds.lengths == [len(item["input_ids"])]  # known at construction, before any decoding
    assert item["images"].shape == (F, 3, 32, 32)
    assert torch.equal(item["images"], video_pixels(media / "a.mp4", proc, "pad"))
    dec = tok.decode(item["input_ids"][item["labels"] != IGNORE_INDEX], skip_special_tokens=False)
    assert dec.strip() == "left</s>"


def test_untagged_video_goes_first_and_plain_keeps_every_run(tmp_path, media, tok, proc):
    rec = {"id": "v", "video": "a.mp4", "conversations": conv("Which way?", "left")}
    for template in ("vicuna_v1", "plain"):
        ds = make([rec], tmp_path, media, tok, proc, template=template)
        item = ds[0]
        (a, b), = runs(item["input_ids"], tok.convert_tokens_to_ids(IMAGE_TOKEN))
        assert b - a == F * P and item["images"].shape[0] == F
    # plain keeps the media tags only (here F <image> tags from one <video>): the frames' runs open the sample
    assert a == 0


def test_mixed_images_and_videos_follow_tag_order(tmp_path, media, tok, proc):
    rec = {"id": "mix", "image": ["red.png", "blue.png"], "video": ["b.mkv", "a.mp4"],
           "conversations": conv("<image> then <video>?", "yes", "Now <video> and <image>.", "ok")}
    item = make([rec], tmp_path, media, tok, proc)[0]
    r = runs(item["input_ids"], tok.convert_tokens_to_ids(IMAGE_TOKEN))
    assert [b - a for a, b in r] == [P, F * P, F * P, P]
    px = lambda n: preprocess(Image.open(media / n).convert("RGB"), proc, "square")  # noqa: E731
    want = torch.cat([px("red.png")[None], video_pixels(media / "b.mkv", proc), video_pixels(media / "a.mp4", proc),
                      px("blue.png")[None]])
    assert torch.equal(item["images"], want)


def test_untagged_video_then_untagged_image_as_generation_prompts(tmp_path, media, tok, proc):
    from nemo_neva.inference.prompting import build_prompt

    rec = {"id": "u", "image": "red.png", "video": "a.mp4", "conversations": conv("Compare.", "ok")}
    item = make([rec], tmp_path, media, tok, proc)[0]
    r = runs(item["input_ids"], tok.convert_tokens_to_ids(IMAGE_TOKEN))
    assert [b - a for a, b in r] == [F * P, P]  # "<video>\n<image>\n": the frames first, then the image
    assert torch.equal(item["images"][:F], video_pixels(media / "a.mp4", proc))
    prompt = build_prompt("vicuna_v1", "Compare.", has_image=True, has_video=True)
    assert prompt.index("<video>") < prompt.index("<image>")  # the same order at inference


def test_video_folder_separate_from_images(tmp_path, media, tok, proc):
    vids = tmp_path / "vids"
    vids.mkdir()
    write_video(vids / "c.mp4", frames_of(5, 2), container="mp4")
    rec = {"id": "v", "image": "red.png", "video": "c.mp4", "conversations": conv("<image><video>", "ok")}
    item = make([rec], tmp_path, media, tok, proc, video_folder=str(vids))[0]
    assert torch.equal(item["images"][1:], video_pixels(vids / "c.mp4", proc))


@pytest.mark.parametrize("rec, reason", [
    ({"video": "broken.mp4"}, "video_corrupt"),
    ({"video": "junk.mp4"}, "video_corrupt"),
    ({"video": "nope.mp4"}, "video_missing"),
    ({"video": "../a.mp4"}, "video_path_escape"),
    ({"video": "red.png"}, "video_bad_format"),
    ({"video": ["a.mp4"], "conversations": conv("<video><video>", "x")}, "video_count_mismatch"),
    ({"conversations": conv("<video>", "x")}, "video_count_mismatch"),
    ({"video": "a.mp4", "conversations": conv("q", "<video>")}, "video_tag_in_reply"),
    ({"video": 3}, "bad_record"),
])
def test_bad_videos_are_counted_skips_with_the_id(tmp_path, media, tok, proc, caplog, rec, reason):
    good = {"id": "good", "video": "a.mp4", "conversations": conv("<video>", "fine")}
    bad = dict({"id": "bad1", "conversations": conv("<video>", "x")}, **rec)
    with caplog.at_level(logging.WARNING, logger="nemo_neva.data.dataset"):
        ds = make([good, bad], tmp_path, media, tok, proc)
    assert dict(ds.skip_counts) == {reason: 1} and [r["id"] for r in ds.records] == ["good"]
    assert "bad1" in caplog.text and reason in caplog.text and "Traceback" not in caplog.text
    with pytest.raises(SampleError, match=f"sample 'bad1': {reason}"):
        make([good, bad], tmp_path, media, tok, proc, strict=True)


def test_corrupt_video_without_prescan_is_a_skip_at_load(tmp_path, media, tok, proc):
    rec = {"id": "late", "video": "broken.mp4", "conversations": conv("<video>", "x")}
    ds = make([rec], tmp_path, media, tok, proc, prescan_images=False)
    assert ds[0] is None and dict(ds.skip_counts) == {"video_corrupt": 1}


@pytest.mark.parametrize("limits, reason", [
    (VideoLimits(max_frames=6), "video_too_many_frames"),  # a.mp4 has 7 frames
    (VideoLimits(max_pixels=24 * 40 * 5 - 1), "video_too_many_pixels"),  # uniform 3 of 7: frames 0..4 decoded
    (VideoLimits(max_bytes=100), "video_too_large"),
])
def test_video_limits(tmp_path, media, tok, proc, limits, reason):
    good = {"id": "ok", "image": "red.png", "conversations": conv("<image>", "fine")}
    rec = {"id": "big", "video": "a.mp4", "conversations": conv("<video>", "x")}
    ds = make([good, rec], tmp_path, media, tok, proc, video_limits=limits)
    assert dict(ds.skip_counts) == {reason: 1}
    with pytest.raises(SampleError, match=reason):
        make([rec], tmp_path, media, tok, proc, video_limits=limits, strict=True)
    # just enough: the same video is kept
    ok = VideoLimits(max_frames=7) if reason.endswith("frames") else (
        VideoLimits(max_pixels=24 * 40 * 5) if reason.endswith("pixels") else VideoLimits(max_bytes=10 ** 6))
    assert make([rec], tmp_path, media, tok, proc, video_limits=ok)[0]["images"].shape[0] == F


def test_video_too_long_for_the_sequence_is_skipped_unread(tmp_path, media, tok, proc):
    rec = {"id": "long", "video": "a.mp4", "conversations": conv("<video>", "x")}
    good = {"id": "ok", "conversations": conv("hi", "there")}
    full = make([good, rec], tmp_path, media, tok, proc)
    run_end = int((full[1]["input_ids"] == tok.convert_tokens_to_ids(IMAGE_TOKEN)).nonzero().max()) + 1
    assert full.lengths[0] < run_end  # the text-only sample fits where the frames do not
    ds = make([good, rec], tmp_path, media, tok, proc, seq_length=run_end - 1, prescan_images=False)
    assert dict(ds.skip_counts) == {"image_does_not_fit": 1}  # from the lengths alone: nothing decoded


def test_packed_rows_keep_each_videos_frames_in_its_segment(tmp_path, media, tok, proc):
    from nemo_neva.data.packing import PackedCollator, PackedNevaDataset

    recs = [{"id": "v", "video": "a.mp4", "conversations": conv("<video>", "left")},
            {"id": "i", "image": "red.png", "video": "b.mkv", "conversations": conv("<image><video>", "ok")}]
    ds = make(recs, tmp_path, media, tok, proc)
    items = [ds[0], ds[1]]
    assert ds.lengths == [len(it["input_ids"]) for it in items]  # the lengths packing plans with, undecoded
    packed = PackedNevaDataset(ds, seq_length=sum(ds.lengths))
    assert len(packed) == 1  # both fit one row
    batch = PackedCollator(tok.pad_token_id, seq_length=sum(ds.lengths))([packed[0]])
    order = [it["id"] for it in packed[0]]
    want = torch.cat([items[[r["id"] for r in recs].index(i)]["images"] for i in order])
    assert batch["num_images"].tolist() == [2 * F + 1] and torch.equal(batch["images"], want)
    img_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert int((batch["tokens"] == img_id).sum()) == (2 * F + 1) * P


def test_a_missing_video_folder_is_a_clear_error(tmp_path, media, tok, proc):
    rec = {"id": "v", "video": "a.mp4", "conversations": conv("<video>", "left")}
    with pytest.raises(FileNotFoundError, match="video folder not found: .*model.data.video_folder"):
        make([rec], tmp_path, media, tok, proc, video_folder=str(tmp_path / "nope"))
    # an image-only dataset never opens the video folder
    assert len(make([{"id": "i", "image": "red.png", "conversations": conv("<image>", "red")}], tmp_path, media,
                    tok, proc, video_folder=str(tmp_path / "nope"))) == 1


def test_video_samples_with_tiling_are_a_counted_skip(tmp_path, media, tok, proc):
    """Frames are not tiled: with model.mm_cfg.image_tiling a video record is refused by name, not mis-counted."""
    from nemo_neva.modules.tiling import Tiling

    recs = [{"id": "v", "video": "a.mp4", "conversations": conv("<video>\nWhich way?", "left")},
            {"id": "i", "image": "red.png", "conversations": conv("<image>\nColour?", "red")}]
    ds = make(recs, tmp_path, media, tok, proc, tiling=Tiling(((32, 64),), 32, 4))
    assert [r["id"] for r in ds.records] == ["i"] and ds.skip_counts == {"video_unsupported": 1}
    with pytest.raises(SampleError, match="image_tiling"):
        make(recs, tmp_path, media, tok, proc, tiling=Tiling(((32, 64),), 32, 4), strict=True)
