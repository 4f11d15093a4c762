"""Videos and anyres-tiled images from tar shards and Megatron-Energon. Oracle: the JSON path (NevaDataset over
the same records and files). The same records, written once by scripts/convert_llava_to_energon.py (its shards are
convert_to_shards' and also a shard folder, index.json included), read back by ShardedNevaDataset and by Energon's
loader with our task encoder, give exactly the JSON path's items: input_ids, labels, pixels (video frames decoded
by PyAV), image_sizes. A corrupt video member is a counted `video_corrupt` skip naming the sample."""
import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from neva_data_helpers import conv, dataset_groups, json_dataset, shard_dataset, write_json
from nemo_neva.data.collate import NevaCollator
from nemo_neva.data.dataset import NevaDataset
from nemo_neva.data.shards import ShardedNevaDataset
from nemo_neva.data.video_io import VideoSettings
from nemo_neva.data.video_writer import write_video
from nemo_neva.modules.tiling import Tiling

from tests.optional import require

require("av")
require("megatron.energon")

from scripts.convert_llava_to_energon import convert  # noqa: E402

P, F, SEQ = 5, 3, 256  # placeholders per (untiled) image, frames per video, sequence length
POOLED = 2  # placeholders per pooled video frame (model.mm_cfg.video.pool; any count the model gives)
KW = dict(template="vicuna_v1", seq_length=SEQ, tokens_per_image=P)
VIDEO_RECORDS = [
    {"id": "mix", "image": ["red.png", "blue.png"], "video": ["b.mkv", "a.mp4"],
     "conversations": conv("<image> then <video>?", "yes", "Now <video> and <image>.", "ok")},
    {"id": "untagged", "image": "red.png", "video": "a.mp4", "conversations": conv("Compare.", "ok")},
    {"id": "text", "conversations": conv("Hi", "Hello")},
    {"id": "bad", "video": "c.mp4", "conversations": conv("<video>\nWhere?", "up")},  # member corrupted below
]
TILED_RECORDS = [
    {"id": "pair", "image": ["wide.png", "tall.png"], "conversations": conv("<image> then <image>", "two")},
    {"id": "one", "image": "wide.png", "conversations": conv("<image>\nShape?", "wide")},
]
# three grids, so the 40x90 and 90x40 images tile (and count) differently
TILING = Tiling(((32, 64), (64, 32), (64, 64)), 32, 2)


def _frames(n, seed, h=24, w=40):
    rng = np.random.default_rng(seed)  # random pixels: a wrong frame cannot match by accident
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    Image.new("RGB", (32, 32), (200, 10, 10)).save(d / "red.png")
    Image.new("RGB", (48, 32), (10, 10, 200)).save(d / "blue.png")
    for name, (h, w) in (("wide.png", (40, 90)), ("tall.png", (90, 40))):
        Image.fromarray(_frames(1, h, h, w)[0]).save(d / name)
    write_video(d / "a.mp4", _frames(7, 0), container="mp4")
    write_video(d / "b.mkv", _frames(4, 1), container="matroska")
    write_video(d / "c.mp4", _frames(5, 2), container="mp4")
    return d


def _corrupt_member(shard, name):
    """Overwrite one member's bytes from a third on with zeros, keeping its size (Energon's tar index stays valid;
    the converter had checked the original)."""
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            if m.name == name:
                data = data[: len(data) // 3] + bytes(len(data) - len(data) // 3)
            tf.addfile(m, io.BytesIO(data))


def _convert(media, root, records):
    src = write_json(root / "data.json", records)
    out = str(root / "energon")
    index = convert(src, str(media), out, samples_per_shard=10, workers=1)  # convert_to_shards + energon prepare
    return src, out, index


@pytest.fixture(scope="module")
def video_data(media, tmp_path_factory):
    src, out, index = _convert(media, tmp_path_factory.mktemp("videos"), VIDEO_RECORDS)
    _corrupt_member(os.path.join(out, "shard-000000.tar"), "000000003.mp4")
    return src, out, index


@pytest.fixture(scope="module")
def tiled_data(media, tmp_path_factory):
    return _convert(media, tmp_path_factory.mktemp("tiled"), TILED_RECORDS)


def _reference(src, media, tok, proc, **kw):
    ref = json_dataset(src, str(media), tok, proc, **KW, **kw)
    return {r["id"]: ref[k] for k, r in enumerate(ref.records)}


def _assert_same_item(got, want):
    assert got["id"] == want["id"]
    for key in ("input_ids", "labels", "images", "image_sizes"):
        a, b = got.get(key), want.get(key)
        assert (a is None and b is None) or torch.equal(a, b), (got["id"], key)


def _energon_batches(out, tok, proc, **kw):
    from nemo_neva.data.energon import build_source

    processor, settings, _ = dataset_groups(tok, proc, shuffle_buffer=1, video_settings=VideoSettings(F), seed=0,
                                            **KW, **kw)
    source = build_source(out, processor, settings, dp_rank=0, dp_size=1, split_part="train")
    return source, list(source.loader(batch_size=1, training=False))


def test_converter_writes_videos_as_members_in_record_order(video_data):
    _, out, index = video_data
    assert index["total"] == 4 and index["skipped"] == {} and index["sample_type"] == "LlavaSample"
    with tarfile.open(os.path.join(out, "shard-000000.tar")) as tf:
        names = tf.getnames()
    assert names == ["000000000.json", "000000000.0.png", "000000000.1.png", "000000000.0.mkv", "000000000.1.mp4",
                     "000000001.json", "000000001.png", "000000001.mp4", "000000002.json",
                     "000000003.json", "000000003.mp4"]
    spec = open(os.path.join(out, ".nv-meta", "dataset.yaml")).read()
    assert "nemo_neva.data.energon_sample" in spec and "LlavaSample" in spec


def test_video_samples_from_shards_are_the_json_items(video_data, media, tok, proc, caplog):
    src, out, _ = video_data
    want = _reference(src, media, tok, proc, video_settings=VideoSettings(F))
    ds = shard_dataset(out, tok, proc, shuffle=False, video_settings=VideoSettings(F), **KW)
    with caplog.at_level(logging.WARNING, logger="nemo_neva.data.dataset"):
        got = list(ds)
    assert [it and it["id"] for it in got] == ["mix", "untagged", "text", None]
    for it in got[:3]:
        _assert_same_item(it, want[it["id"]])
    assert got[0]["images"].shape[0] == 2 + 2 * F  # red, b.mkv's frames, a.mp4's frames, blue
    assert dict(ds.skip_counts) == {"video_corrupt": 1}
    assert "'bad'" in caplog.text and "000000003.mp4" not in caplog.text and "c.mp4" in caplog.text


def test_video_samples_from_energon_are_the_json_items(video_data, media, tok, proc, caplog):
    src, out, _ = video_data
    want = _reference(src, media, tok, proc, video_settings=VideoSettings(F))
    with caplog.at_level(logging.WARNING, logger="nemo_neva.data.dataset"):
        source, batches = _energon_batches(out, tok, proc)
    assert sorted(b["ids"][0] for b in batches) == ["mix", "text", "untagged"]  # the corrupt one skipped
    for b in batches:
        ref = NevaCollator(tok.pad_token_id)([want[b["ids"][0]]])
        for key in ("tokens", "labels", "loss_mask", "num_images", "images"):
            torch.testing.assert_close(b[key], ref[key], rtol=0, atol=0, msg=key)
    assert dict(source.skip_counts) == {"video_corrupt": 1} and "'bad'" in caplog.text


def test_tiled_images_from_shards_and_energon_are_the_json_items(tiled_data, media, tok, proc):
    from nemo_neva.data.packed_shards import PackedShardDataset

    src, out, index = tiled_data
    assert index["sample_type"] == "VQASample"  # Energon's own type carries tiled images too
    want = _reference(src, media, tok, proc, tiling=TILING)  # the processor makes the tiling image processor
    assert want["pair"]["image_sizes"].tolist() == [[40, 90], [90, 40]]
    assert TILING.tokens(40, 90) != TILING.tokens(90, 40)  # so a swapped order cannot pass
    ds = shard_dataset(out, tok, proc, shuffle=False, tiling=TILING, **KW)
    got = list(ds)
    assert [it["id"] for it in got] == ["pair", "one"]
    for it in got:
        _assert_same_item(it, want[it["id"]])
    # packed windows plan with the lengths (the counts read from the image headers), then load the same items
    rows = list(PackedShardDataset(ds, seq_length=SEQ * 2, window=10))
    assert sorted(it["id"] for row in rows for it in row) == ["one", "pair"]
    for it in (it for row in rows for it in row):
        _assert_same_item(it, want[it["id"]])
    _, batches = _energon_batches(out, tok, proc, tiling=TILING)
    assert sorted(b["ids"][0] for b in batches) == ["one", "pair"]
    for b in batches:
        ref = NevaCollator(tok.pad_token_id)([want[b["ids"][0]]])
        for key in ("tokens", "labels", "loss_mask", "num_images", "images", "image_sizes"):
            torch.testing.assert_close(b[key], ref[key], rtol=0, atol=0, msg=key)


def test_bad_videos_are_left_out_at_conversion_with_their_reason(media, tmp_path):
    from nemo_neva.data.shard_writer import convert_to_shards

    data = (media / "a.mp4").read_bytes()
    (tmp_path / "vids").mkdir()
    (tmp_path / "vids" / "cut.mp4").write_bytes(data[: len(data) // 3])
    (tmp_path / "vids" / "ok.mp4").write_bytes(data)
    recs = [{"id": "cut", "video": "cut.mp4", "conversations": conv("<video>", "x")},
            {"id": "gone", "video": "nope.mp4", "conversations": conv("<video>", "x")},
            {"id": "escape", "video": "../a.mp4", "conversations": conv("<video>", "x")},
            {"id": "ok", "image": "red.png", "video": "ok.mp4", "conversations": conv("<image><video>", "x")}]
    src = write_json(tmp_path / "v.json", recs)
    index = convert_to_shards(src, str(media), str(tmp_path / "shards"), video_folder=str(tmp_path / "vids"))
    assert index["total"] == 1
    assert index["skipped"] == {"video_corrupt": 1, "video_missing": 1, "video_path_escape": 1}
    rejected = [json.loads(line) for line in open(tmp_path / "shards" / "rejected.jsonl")]
    assert [(r["id"], r["reason"]) for r in rejected] == [("cut", "video_corrupt"), ("gone", "video_missing"),
                                                          ("escape", "video_path_escape")]
    with pytest.raises(ValueError, match="--sample-type llava"):  # Energon's VQASample cannot carry videos
        convert(src, str(media), str(tmp_path / "e"), sample_type="vqa", video_folder=str(tmp_path / "vids"))


def test_energon_sample_types_with_videos_map_to_records():
    from megatron.energon import VidQASample

    from nemo_neva.data.energon_encoding import sample_to_record
    from nemo_neva.data.energon_sample import LlavaSample

    common = dict(__key__="k", __restore_key__=(), __subflavors__={}, __sources__=())
    rec = {"id": "x", "image": "a.png", "video": ["v.mp4", "w.mkv"], "system": "S",
           "conversations": conv("<video><image><video>", "ok")}
    got, images, videos = sample_to_record(LlavaSample(**common, record=rec, images=[b"i"], videos=[b"v", b"w"]))
    assert got == dict(rec, id="k") and images == [b"i"] and videos == [b"v", b"w"]
    got, images, videos = sample_to_record(VidQASample(**common, video=b"mp4", context="<video>\nq", answers=["a"]))
    assert got == {"id": "k", "video": "k", "conversations": conv("<video>\nq", "a")} and videos == [b"mp4"]
    assert images == []
