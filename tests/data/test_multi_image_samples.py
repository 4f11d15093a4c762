"""Several images per sample: interleaved tags, counted mismatches, limits, collate / packing order, and the
tar-shard and Energon round trips of a two-image record."""
import logging
import os
import tarfile

import pytest
import torch
from PIL import Image

from neva_data_helpers import conv, dataset_groups, json_dataset, placeholder_runs as runs, shard_dataset, write_json
from neva_image_helpers import bomb_png
from nemo_neva.data.collate import NevaCollator
from nemo_neva.data.constants import IGNORE_INDEX, IMAGE_TOKEN
from nemo_neva.data.dataset import SampleError
from nemo_neva.data.image_io import preprocess
from nemo_neva.data.packing import PackedCollator
from tests.optional import require

P = 6  # placeholder tokens per image in these tests

# tags in turn 0 and turn 2; the image list is not in file-name order, so order cannot come from sorting
TWO = {"id": "two", "image": ["red.png", "blue.png"],
       "conversations": conv("<image>\nWhat colour?", "red", "And <image> this one?", "blue")}


@pytest.fixture
def images(image_dir):
    Image.new("RGB", (40, 40), (10, 200, 10)).save(image_dir / "green.png")
    (image_dir / "bomb.png").write_bytes(bomb_png(6000, 6000))
    return image_dir


def make(recs, tmp_path, folder, tok, proc, name="d.json", **kw):
    kw.setdefault("template", "vicuna_v1")
    kw.setdefault("seq_length", 128)
    kw.setdefault("tokens_per_image", P)
    return json_dataset(write_json(tmp_path / name, recs), str(folder), tok, proc, **kw)


def pixels_of(folder, name, proc, mode="square"):
    return preprocess(Image.open(os.path.join(folder, name)).convert("RGB"), proc, mode)


def test_interleaved_tags_take_the_images_in_order(tmp_path, images, tok, proc):
    ds = make([TWO], tmp_path, images, tok, proc, image_aspect_ratio="pad")
    item = ds[0]
    img_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    ids, labels = item["input_ids"], item["labels"]
    (a0, a1), (b0, b1) = runs(ids, img_id)
    assert a1 - a0 == P and b1 - b0 == P
    assert (labels[a0:a1] == IGNORE_INDEX).all() and (labels[b0:b1] == IGNORE_INDEX).all()
    # the text around the runs puts them where the tags were: turn 0's start, inside turn 2
    dec = lambda t: tok.decode(t, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    assert dec(ids[:a0]).endswith("USER: ")
    assert dec(ids[a1:b0]) == "\nWhat colour? ASSISTANT: red</s>USER: And "
    assert dec(ids[b1:]) == " this one? ASSISTANT: blue</s>"
    trained = dec(ids[labels != IGNORE_INDEX])
    assert trained == " red</s> blue</s>"  # only the replies (byte-level BPE: " red" is one token)
    # pixels: each image exactly as the HF processor makes it from its file, in tag order
    assert item["images"].shape == (2, 3, 32, 32)
    assert torch.equal(item["images"][0], pixels_of(images, "red.png", proc, "pad"))
    assert torch.equal(item["images"][1], pixels_of(images, "blue.png", proc, "pad"))


def test_untagged_images_all_go_first(tmp_path, images, tok, proc):
    rec = {"id": "untagged", "image": ["blue.png", "green.png"], "conversations": conv("Compare them.", "ok")}
    item = make([rec], tmp_path, images, tok, proc)[0]
    img_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    (a0, a1), (b0, b1) = runs(item["input_ids"], img_id)
    text = tok.decode(item["input_ids"][a1:b0], skip_special_tokens=False)
    assert text == "\n" and tok.decode(item["input_ids"][:a0]).endswith("USER: ")
    assert tok.decode(item["input_ids"][b1:]).startswith("\nCompare them. ASSISTANT:")
    assert torch.equal(item["images"][1], pixels_of(images, "green.png", proc))


def test_one_image_as_a_list_is_the_single_image_sample(tmp_path, images, tok, proc):
    one = {"id": "a", "image": "red.png", "conversations": conv("<image>\nColour?", "red")}
    ds = make([one, dict(one, id="b", image=["red.png"])], tmp_path, images, tok, proc)
    assert torch.equal(ds[0]["input_ids"], ds[1]["input_ids"]) and torch.equal(ds[0]["images"], ds[1]["images"])


MISMATCHED = [
    {"id": "two_tags_one_image", "image": "red.png", "conversations": conv("<image> and <image>?", "a")},
    {"id": "one_tag_two_images", "image": ["red.png", "blue.png"], "conversations": conv("<image>?", "a")},
    {"id": "tag_no_image", "conversations": conv("<image> what?", "a")},
    {"id": "late_tag_no_image", "conversations": conv("hi", "hello", "<image>?", "b")},
]


def test_count_mismatches_are_counted_skips_with_their_ids(tmp_path, images, tok, proc, caplog):
    with caplog.at_level(logging.WARNING):
        ds = make([TWO] + MISMATCHED, tmp_path, images, tok, proc)
    assert dict(ds.skip_counts) == {"image_count_mismatch": len(MISMATCHED)}
    assert [r["id"] for r in ds.records] == ["two"]
    for rec in MISMATCHED:
        assert f"{rec['id']!r} (image_count_mismatch)" in caplog.text


@pytest.mark.parametrize("rec", MISMATCHED, ids=[r["id"] for r in MISMATCHED])
def test_strict_mismatch_raises_naming_the_sample(rec, tmp_path, images, tok, proc):
    with pytest.raises(SampleError, match="image_count_mismatch") as e:
        make([TWO, rec], tmp_path, images, tok, proc, strict=True)
    assert str(e.value).startswith(f"sample {rec['id']!r}: image_count_mismatch: ")


def test_tags_in_replies_and_bad_lists_stay_refused(tmp_path, images, tok, proc):
    recs = [TWO, {"id": "reply", "image": ["red.png", "blue.png"],
                  "conversations": conv("<image>?", "it is <image>")},
            {"id": "nonstr", "image": ["red.png", 3], "conversations": conv("<image><image>", "a")}]
    ds = make(recs, tmp_path, images, tok, proc)
    assert dict(ds.skip_counts) == {"image_tag_in_reply": 1, "bad_record": 1}


def test_too_many_images(tmp_path, images, tok, proc):
    three = {"id": "three", "image": ["red.png", "blue.png", "green.png"],
             "conversations": conv("<image><image><image> differences?", "colour")}
    ds = make([TWO, three], tmp_path, images, tok, proc, max_images_per_sample=2)
    assert dict(ds.skip_counts) == {"too_many_images": 1} and len(ds) == 1
    assert make([TWO, three], tmp_path, images, tok, proc, max_images_per_sample=3)[1]["images"].shape[0] == 3
    with pytest.raises(SampleError, match="'three': too_many_images: 3 images > max_images_per_sample 2"):
        make([three], tmp_path, images, tok, proc, max_images_per_sample=2, strict=True)


def test_the_last_image_run_must_fit(tmp_path, images, tok, proc):
    """Truncation cuts text only: a sample whose second run would cross seq_length is skipped, one whose
    runs both fit keeps both whole and loses its tail text."""
    filler = "word " * 20
    late = {"id": "late", "image": ["red.png", "blue.png"],
            "conversations": conv("<image>\nfirst", "ok", filler + "<image>", "ok")}
    ds_full = make([late], tmp_path, images, tok, proc, name="full.json", seq_length=1024)
    img_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    (_, _), (b0, b1) = runs(ds_full[0]["input_ids"], img_id)
    n = len(ds_full[0]["input_ids"])
    assert n > b1 + 2  # text after the second run, so a cut between b1 and n truncates text only
    cut = make([late], tmp_path, images, tok, proc, name="cut.json", seq_length=b1 + 2)
    assert cut.truncated == 1 and len(cut[0]["input_ids"]) == b1 + 2
    assert len(runs(cut[0]["input_ids"], img_id)) == 2 and cut[0]["images"].shape[0] == 2
    with pytest.raises(ValueError, match="no usable samples.*image_does_not_fit=1"):
        make([late], tmp_path, images, tok, proc, name="nofit.json", seq_length=b1 - 1)
    with pytest.raises(SampleError, match="the last image run ends at"):
        make([late], tmp_path, images, tok, proc, name="nofit.json", seq_length=b0 + 1, strict=True)


def test_prescan_checks_every_image(tmp_path, images, tok, proc):
    recs = [TWO, dict(TWO, id="second_missing", image=["red.png", "nope.png"]),
            dict(TWO, id="second_bomb", image=["red.png", "bomb.png"])]
    ds = make(recs, tmp_path, images, tok, proc)
    assert dict(ds.skip_counts) == {"image_missing": 1, "image_too_many_pixels": 1} and len(ds) == 1


# ------------------------------------------------------------------------------------------ collate / packing
def _item(n_ids, n_images, tag, sid):
    ids = torch.arange(1, n_ids + 1)
    labels = ids.clone()
    labels[0] = IGNORE_INDEX
    imgs = torch.stack([torch.full((3, 4, 4), float(tag * 10 + k)) for k in range(n_images)]) if n_images else None
    return {"input_ids": ids, "labels": labels, "images": imgs, "id": sid}


def test_collate_concatenates_rows_images_in_order():
    a, c, d = _item(5, 2, 1, "a"), _item(4, 0, 3, "c"), _item(6, 1, 4, "d")
    out = NevaCollator(pad_id=0)([a, None, c, d])
    assert out["num_images"].tolist() == [2, 0, 0, 1] and int(out["num_dropped"]) == 1
    assert out["images"][:, 0, 0, 0].tolist() == [10, 11, 40]  # row a's two (in tag order), then d's
    assert out["ids"] == ["a", None, "c", "d"]
    with pytest.raises(ValueError, match="'bad'.*\\[n, 3, H, W\\]"):
        NevaCollator(pad_id=0)([dict(a, images=torch.zeros(3, 4, 4), id="bad")])


def test_packed_rows_holding_zero_one_and_two_images():
    rows = [[_item(5, 2, 1, "a"), _item(3, 0, 2, "b")], [_item(4, 1, 3, "c"), None, _item(4, 2, 4, "d")],
            [_item(3, 0, 5, "e")]]
    out = PackedCollator(pad_id=0, seq_length=12)(rows)
    assert out["num_images"].tolist() == [2, 3, 0]
    assert out["images"][:, 0, 0, 0].tolist() == [10, 11, 30, 40, 41]  # row order, then segment, then tag order
    assert int(out["num_dropped"]) == 1 and out["ids"] == [["a", "b"], ["c", "d"], ["e"]]


def test_packed_dataset_rows_have_every_placeholder_run(tmp_path, images, tok, proc):
    from nemo_neva.data.packing import PackedNevaDataset

    one = {"id": "one", "image": "green.png", "conversations": conv("<image>\nColour?", "green")}
    text = {"id": "text", "conversations": conv("Hi", "Hello")}
    recs = [dict(TWO, id=f"two{i}") for i in range(3)] + [dict(one, id=f"one{i}") for i in range(3)] + [text] * 2
    ds = make(recs, tmp_path, images, tok, proc, seq_length=96)
    packed = PackedNevaDataset(ds, seq_length=96)
    assert len(packed) < len(ds)
    out = PackedCollator(tok.pad_token_id, seq_length=96)([packed[i] for i in range(len(packed))])
    img_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ((out["tokens"] == img_id).sum(1) == out["num_images"] * P).all()
    assert int(out["num_images"].sum()) == out["images"].shape[0] == 3 * 2 + 3
    # the images follow the rows' segments: image k belongs to the k-th placeholder run of the batch
    files = {"two": ["red.png", "blue.png"], "one": ["green.png"], "tex": []}
    want = [name for row in out["ids"] for sid in row for name in files[sid[:3]]]
    for k, name in enumerate(want):
        assert torch.equal(out["images"][k], pixels_of(images, name, proc))


# ------------------------------------------------------------------------------------------ shards / Energon
def _mixed_records():
    return [TWO, {"id": "one", "image": "green.png", "conversations": conv("<image>\nColour?", "green")},
            {"id": "text", "conversations": conv("Hi", "Hello")}]


def test_shards_round_trip_a_two_image_record(tmp_path, images, tok, proc):
    from nemo_neva.data.shard_writer import convert_to_shards

    src = write_json(tmp_path / "m.json", _mixed_records())
    out = str(tmp_path / "shards")
    index = convert_to_shards(src, str(images), out, samples_per_shard=10)
    assert index["total"] == 3 and index["skipped"] == {}
    with tarfile.open(os.path.join(out, "shard-000000.tar")) as tf:
        names = tf.getnames()
    assert names == ["000000000.json", "000000000.0.png", "000000000.1.png", "000000001.json", "000000001.png",
                     "000000002.json"]  # several images numbered in tag order; an only image keeps <key>.png
    kw = dict(template="vicuna_v1", seq_length=128, tokens_per_image=P)
    ref = json_dataset(src, str(images), tok, proc, **kw)
    got = list(shard_dataset(out, tok, proc, shuffle=False, **kw))
    assert [it["id"] for it in got] == ["two", "one", "text"]
    for it, want in zip(got, (ref[i] for i in range(3))):
        assert torch.equal(it["input_ids"], want["input_ids"]) and torch.equal(it["labels"], want["labels"])
        assert (it["images"] is None and want["images"] is None) or torch.equal(it["images"], want["images"])
    assert got[0]["images"].shape[0] == 2


def test_energon_round_trip_a_two_image_record(tmp_path, images, tok, proc):
    require("megatron.energon")
    from nemo_neva.data.energon import build_source
    from scripts.convert_llava_to_energon import convert

    src = write_json(tmp_path / "m.json", _mixed_records())
    out = str(tmp_path / "energon")
    index = convert(src, str(images), out, samples_per_shard=10, sample_type="auto", workers=1)  # energon prepare
    assert index["sample_type"] == "VQASample" and index["total"] == 3
    processor, settings, _ = dataset_groups(tok, proc, template="vicuna_v1", image_aspect_ratio="square",
                                           shuffle_buffer=1, seq_length=128, tokens_per_image=P, seed=0)
    source = build_source(out, processor, settings, dp_rank=0, dp_size=1, split_part="train")
    batches = list(source.loader(batch_size=3, training=False))
    assert len(batches) == 1 and sorted(batches[0]["ids"]) == ["one", "text", "two"]
    ref = json_dataset(src, str(images), tok, proc, template="vicuna_v1", seq_length=128, tokens_per_image=P)
    pos = {r["id"]: k for k, r in enumerate(ref.records)}
    want = NevaCollator(tok.pad_token_id)([ref[pos[i]] for i in batches[0]["ids"]])
    for key in ("tokens", "labels", "loss_mask", "num_images", "images"):
        torch.testing.assert_close(batches[0][key], want[key], rtol=0, atol=0, msg=key)
    assert int(batches[0]["num_images"].sum()) == 3
