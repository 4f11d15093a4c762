"""Packing over streamed shards: every sample once per epoch over dp ranks, the same number of rows on every
rank, rows within seq_length, worker-count independent content, bad samples counted once, resumable."""
import json
import os

import pytest

from neva_data_helpers import REPO, conv, write_json
from nemo_neva.data.packed_shards import PackedShardDataset, PackedShardLoader
from nemo_neva.data.packing import PackedCollator
from nemo_neva.data.shards import ShardedNevaDataset, convert_to_shards

DEMO = os.path.join(REPO, "data", "shapes_demo")
SEQ = 40


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """37 demo captions of varied length + 3 bad text records, 9 samples per shard."""
    tmp = tmp_path_factory.mktemp("pshards")
    with open(os.path.join(DEMO, "stage1_captions.json")) as f:
        records = json.load(f)[:37]
    for i, r in enumerate(records):  # vary the lengths so rows hold 1-3 samples
        r["conversations"][1]["value"] += " more" * (i % 7)
    records[5:5] = [{"id": f"bad{i}", "image": records[0]["image"],
                     "conversations": conv("<image> <image>\nq", "a")} for i in range(3)]
    out = str(tmp / "out")
    convert_to_shards(write_json(tmp / "src.json", records), os.path.join(DEMO, "images"), out, samples_per_shard=9)
    return out


def rank_rows(shards, tok, proc, dp_rank, dp, workers=0, batch=2, window=12, state=None, batches=None):
    ds = ShardedNevaDataset(shards, tok, proc, template="plain", seq_length=SEQ, num_image_tokens=4,
                            dp_rank=dp_rank, dp_size=dp, shuffle_buffer=5, seed=3)
    if state is not None:
        ds.load_state_dict(state)
    dl = PackedShardLoader(PackedShardDataset(ds, SEQ, window=window), batch_size=batch, num_workers=workers,
                           collate_fn=PackedCollator(tok.pad_token_id, seq_length=SEQ, skip_source=ds.take_new_skips))
    out, skips, states = [], 0, []
    for k, b in enumerate(dl):
        if batches is not None and k == batches:
            break
        assert b["tokens"].shape[1] == SEQ and (b["segment_ids"] >= 0).all()
        out.append([i for row in b["ids"] for i in row])
        skips += sum(b["skips"].values())
        states.append(ds.state_dict())
    return out, skips, ds, states


def ids_in(batch_rows):
    return [i for b in batch_rows for i in b]


def test_every_sample_once_over_ranks_equal_rows(shards, tok, proc):
    got, skips, rows = [], 0, []
    for rank in range(2):
        batches, sk, ds, _ = rank_rows(shards, tok, proc, rank, 2)
        got += ids_in(batches)
        skips += sk
        rows.append(len(batches))
        assert ds.epoch == 1  # the loader moved to the next epoch
    assert sorted(got) == sorted(set(got)) and len(got) == 37  # every good sample exactly once
    assert skips == 3  # each bad record counted by one rank only
    assert rows[0] == rows[1]  # same number of batches on both ranks


def test_workers_deliver_the_same_samples(shards, tok, proc):
    ref = ids_in(rank_rows(shards, tok, proc, 0, 1)[0])
    two, skips, _, _ = rank_rows(shards, tok, proc, 0, 1, workers=2)
    assert sorted(ids_in(two)) == sorted(ref) and len(ref) == 37 and skips == 3


def test_packs_several_samples_per_row(shards, tok, proc):
    ds = ShardedNevaDataset(shards, tok, proc, template="plain", seq_length=SEQ, num_image_tokens=4, seed=3)
    rows = list(PackedShardDataset(ds, SEQ, window=12))
    assert sum(len(r) for r in rows) == 37 and len(rows) < 30
    assert [r.window_done for r in rows if r.window_done is not None] == [0, 1, 2, 3]
    assert all(sum(len(it["input_ids"]) - 1 for it in r) <= SEQ for r in rows)


def test_resume_replays_unfinished_windows_loses_nothing(shards, tok, proc):
    first, _, _, states = rank_rows(shards, tok, proc, 0, 1, batches=7)
    state = states[-1]
    assert state["consumed"] % 12 == 0 and 0 < state["consumed"] < 40
    rest, _, _, _ = rank_rows(shards, tok, proc, 0, 1, state=state)
    seen = set(ids_in(first)) | set(ids_in(rest))
    assert len(seen) == 37  # nothing lost across the restart
    assert len(ids_in(first)) + len(ids_in(rest)) > 37  # the unfinished window is served again


def test_a_training_resume_on_packed_shards_is_refused_clearly(shards, tok, proc):
    from nemo_neva.checkpointing_data import fast_forward

    ds = ShardedNevaDataset(shards, tok, proc, template="plain", seq_length=SEQ, num_image_tokens=4)
    dl = PackedShardLoader(PackedShardDataset(ds, SEQ, window=12), batch_size=2)
    with pytest.raises(ValueError, match="packed tar shards .* not supported"):
        fast_forward(dl, 16)
