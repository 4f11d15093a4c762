"""Tar shards: conversion (with counted rejects), items equal to NevaDataset's, exactly-once split over
data-parallel ranks x DataLoader workers, seeded order, and resume from a sample count."""
import itertools
import json
import os

import pytest
import torch

from neva_data_helpers import REPO, conv, json_dataset, shard_dataset, write_json
from neva_image_helpers import truncated_png
from nemo_neva.data.dataset import NevaDataset
from nemo_neva.data.shards import (ShardedLoader, buffer_shuffle_order, expand_braces,
                                   is_shard_spec, resolve_shards)
from scripts.convert_llava_to_shards import main as convert_main
from tests.optional import require

DEMO = os.path.join(REPO, "data", "shapes_demo")
N = 40
KW = dict(template="plain", seq_length=64, tokens_per_image=4)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(records json, shard folder) for the first N demo captions, 10 per shard."""
    tmp = tmp_path_factory.mktemp("shards")
    with open(os.path.join(DEMO, "stage1_captions.json")) as f:
        records = json.load(f)[:N]
    src = write_json(tmp / "slice.json", records)
    out = str(tmp / "out")
    assert convert_main(["--data-path", src, "--image-folder", os.path.join(DEMO, "images"),
                         "--output-dir", out, "--samples-per-shard", "10"]) == 0
    return src, out


def sharded(out, tok, proc, **kw):
    return shard_dataset(out, tok, proc, **KW, **kw)


def ids_of(ds):
    return [it["id"] for it in ds]


def loader_ids(ds, batch_size, workers, batches=None):
    dl = ShardedLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=lambda b: [it["id"] for it in b])
    out = []
    for batch in itertools.islice(dl, batches):
        out += batch
    return out


def test_index_and_items_equal_neva_dataset(demo, tok, proc):
    src, out = demo
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    assert [s["samples"] for s in index["shards"]] == [10, 10, 10, 10]
    assert index["total"] == N and index["skipped"] == {}
    ref = json_dataset(src, os.path.join(DEMO, "images"), tok, proc, **KW)
    got = list(sharded(out, tok, proc, shuffle=False))
    assert len(got) == len(ref) == N
    for i, it in enumerate(got):
        want = ref[i]
        assert it["id"] == want["id"]
        assert torch.equal(it["input_ids"], want["input_ids"]) and torch.equal(it["labels"], want["labels"])
        assert torch.equal(it["images"], want["images"])


def test_patterns_resolve_like_the_index(demo):
    _, out = demo
    pattern = os.path.join(out, "shard-{000000..000003}.tar")
    assert expand_braces("a{0..2}{x,y}") == ["a0x", "a0y", "a1x", "a1y", "a2x", "a2y"]
    assert is_shard_spec(out) and is_shard_spec(pattern) and not is_shard_spec(os.path.join(DEMO, "stage1_captions.json"))
    assert resolve_shards(pattern) == resolve_shards(out) == resolve_shards(os.path.join(out, "index.json"))
    os.rename(os.path.join(out, "index.json"), os.path.join(out, "index.bak"))
    try:  # without an index, counts come from the tar headers
        assert resolve_shards(pattern) == [(os.path.join(out, f"shard-{i:06d}.tar"), 10) for i in range(4)]
    finally:
        os.rename(os.path.join(out, "index.bak"), os.path.join(out, "index.json"))


def test_webdataset_reads_the_shards(demo):
    wds = require("webdataset")
    _, out = demo
    samples = list(wds.WebDataset(os.path.join(out, "shard-{000000..000003}.tar"), shardshuffle=False))
    assert len(samples) == N and all({"json", "png"} <= set(s) for s in samples)


def test_dp2_x_workers2_every_sample_once(demo, tok, proc):
    _, out = demo
    per_rank = []
    for rank in (0, 1):
        ds = sharded(out, tok, proc, dp_rank=rank, dp_size=2, seed=7, shuffle_buffer=4)
        assert len(ds) == N // 2
        in_process = ids_of(sharded(out, tok, proc, dp_rank=rank, dp_size=2, seed=7, shuffle_buffer=4))
        got = loader_ids(ds, batch_size=3, workers=2)
        assert got == in_process  # workers do not change a rank's order
        assert ds.state_dict()["epoch"] == 1 and ds.consumed == 0  # the pass ended the epoch
        per_rank.append(got)
    assert not set(per_rank[0]) & set(per_rank[1])
    everything = per_rank[0] + per_rank[1]
    assert sorted(everything) == sorted(f"cap_{i:05d}" for i in range(N)) and len(set(everything)) == N


def test_same_seed_same_order(demo, tok, proc):
    _, out = demo
    a = ids_of(sharded(out, tok, proc, seed=1, shuffle_buffer=4))
    assert a == ids_of(sharded(out, tok, proc, seed=1, shuffle_buffer=4))
    assert a != ids_of(sharded(out, tok, proc, seed=2, shuffle_buffer=4))
    ds = sharded(out, tok, proc, seed=1, shuffle_buffer=4)
    ds.set_epoch(1)
    b = ids_of(ds)
    assert a != b and sorted(a) == sorted(b)
    assert a != sorted(a)
    # a bounded buffer really is bounded: nothing leaves more than `buffer` places before it entered
    order = buffer_shuffle_order(100, 4, __import__("random").Random(0))
    assert sorted(order) == list(range(100)) and all(p >= i - 4 for p, i in enumerate(order))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_trainer_that_stops_at_the_length_gets_the_next_epoch(demo, tok, proc, workers):
    """Lightning reads len(loader) once and ends its epoch after that many batches without exhausting the
    iterator; the next pass must then be the next epoch (it used to be empty, so training never advanced)."""
    _, out = demo
    ds = sharded(out, tok, proc, seed=3, shuffle_buffer=4, drop_remainder=True)
    dl = ShardedLoader(ds, batch_size=4, num_workers=workers, collate_fn=lambda b: [it["id"] for it in b])
    per_epoch = len(dl)
    assert per_epoch == N // 4

    def epoch_ids(epoch, start=0):
        ref = sharded(out, tok, proc, seed=3, shuffle_buffer=4)
        ref.set_epoch(epoch)
        return ids_of(ref)[start:]

    passes = [[i for b in itertools.islice(dl, per_epoch) for i in b] for _ in range(2)]
    assert passes == [epoch_ids(0), epoch_ids(1)] and ds.epoch == 1 and len(dl) == per_epoch
    ds.load_state_dict({"epoch": 4, "consumed": 12, "seed": 3, "total": N})  # a mid-epoch resume
    assert len(dl) == per_epoch  # what is left is 7 batches; the trainer's restored batch count adds the 3
    rest = list(itertools.islice(dl, per_epoch))
    assert len(rest) == per_epoch - 3 and [i for b in rest for i in b] == epoch_ids(4, 12)
    assert [i for b in itertools.islice(dl, 1) for i in b] == epoch_ids(5)[:4]
    tiny = sharded(out, tok, proc, drop_remainder=True, batch_size=N + 1)  # no full batch: an error, not a hang
    with pytest.raises(ValueError, match="fewer than one global batch"):
        next(iter(tiny))


def test_resume_continues_with_the_rest(demo, tok, proc):
    _, out = demo
    full = ids_of(sharded(out, tok, proc, seed=3, shuffle_buffer=4))
    ds = sharded(out, tok, proc, seed=3, shuffle_buffer=4)
    head = [it["id"] for it in itertools.islice(iter(ds), 13)]
    state = ds.state_dict()
    assert head == full[:13] and state == {"epoch": 0, "consumed": 13, "seed": 3, "total": N}
    again = sharded(out, tok, proc, seed=3, shuffle_buffer=4)
    again.load_state_dict(state)
    assert len(again) == N and ids_of(again) == full[13:]  # the length is the whole epoch's, a constant

    # through DataLoader workers, then restarted on two data-parallel ranks
    ds = sharded(out, tok, proc, seed=3, shuffle_buffer=4)
    assert loader_ids(ds, batch_size=4, workers=2, batches=2) == full[:8]
    state = ds.state_dict()
    assert state["consumed"] == 8
    ranks = []
    for rank in (0, 1):
        r = sharded(out, tok, proc, seed=3, shuffle_buffer=4, dp_rank=rank, dp_size=2)
        r.load_state_dict(state)
        ranks.append(loader_ids(r, batch_size=2, workers=2))
    assert ranks[0] == full[8::2] and ranks[1] == full[9::2]
    with pytest.raises(ValueError):
        sharded(out, tok, proc, seed=4).load_state_dict(state)


def test_bad_samples_are_counted_at_conversion(tmp_path, image_dir, tok, proc):
    (image_dir / "bad.png").write_bytes(truncated_png())
    records = [
        {"id": "good", "image": "red.png", "conversations": conv("<image>\nColour?", "red")},
        {"id": "corrupt", "image": "bad.png", "conversations": conv("<image>\nQ", "A")},
        {"id": "missing", "image": "nope.png", "conversations": conv("<image>\nQ", "A")},
        '{"id": "broken", "conversations": [',
        {"id": "text", "conversations": conv("Q", "A")},
    ]
    src = write_json(tmp_path / "d.jsonl", records, jsonl=True)
    out = str(tmp_path / "out")
    assert convert_main(["--data-path", src, "--image-folder", str(image_dir), "--output-dir", out,
                         "--samples-per-shard", "1"]) == 0
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    assert index["records"] == 5 and index["total"] == 2 and len(index["shards"]) == 2
    assert index["skipped"] == {"image_corrupt": 1, "image_missing": 1, "malformed_json": 1}
    with open(os.path.join(out, "rejected.jsonl")) as f:
        rejected = [json.loads(line) for line in f]
    assert [(r["id"], r["reason"]) for r in rejected] == [
        ("corrupt", "image_corrupt"), ("missing", "image_missing"), ("d.jsonl:4", "malformed_json")]
    assert sorted(ids_of(shard_dataset(out, tok, proc, **KW))) == ["good", "text"]
    assert convert_main(["--data-path", src, "--output-dir", out]) == 2  # refuses to mix into old shards
