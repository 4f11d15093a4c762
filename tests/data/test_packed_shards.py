"""Packing over streamed shards: every sample once per epoch over dp ranks, the same number of rows on every
rank, rows within seq_length, worker-count independent content, bad samples counted once, resumable."""
import json
import os

import pytest
from neva_data_helpers import REPO, conv, shard_dataset, write_json

from nemo_neva.data.packed_shards import PackedShardDataset, PackedShardLoader
from nemo_neva.data.packing import PackedCollator
from nemo_neva.data.shard_writer import convert_to_shards

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
    ds = shard_dataset(shards, tok, proc, template="plain", seq_length=SEQ, tokens_per_image=4,
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
    ds = shard_dataset(shards, tok, proc, template="plain", seq_length=SEQ, tokens_per_image=4, seed=3)
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


def packed_loader(shards, tok, proc, dp_rank=0, dp=1, workers=0, batch=2, window=12):
    ds = shard_dataset(shards, tok, proc, template="plain", seq_length=SEQ, tokens_per_image=4,
                            dp_rank=dp_rank, dp_size=dp, shuffle_buffer=5, seed=3)
    return PackedShardLoader(PackedShardDataset(ds, SEQ, window=window), batch_size=batch, num_workers=workers,
                             collate_fn=PackedCollator(tok.pad_token_id, seq_length=SEQ, skip_source=ds.take_new_skips))


def test_trained_position_ignores_the_prefetched_batch(shards, tok, proc):
    """As Lightning does: batch k+1 is fetched before batch k is trained (and checkpointed)."""
    dl = packed_loader(shards, tok, proc)
    ds = dl.dataset.sharded
    it = iter(dl)
    after, batches = [], []
    nxt = next(it)
    while nxt is not None:
        batches.append(nxt)
        after.append(ds.state_dict())  # the loader's own position once this batch was handed out
        nxt = next(it, None)  # prefetch: may finish a window whose rows were never trained
        dl.mark_trained()
        if nxt is not None:
            assert dl.trained_state() == after[-1]
    assert any(a != b for a, b in zip(after, after[1:]))  # windows finish along the way
    assert dl.trained_state() == {"epoch": 1, "consumed": 0, "seed": 3, "total": 40}  # the epoch's last batch
    # a position saved mid-epoch, restored into a new loader: it continues at that window, not window 0
    k = next(k for k, a in enumerate(after) if 0 < a["consumed"] < 40)
    fresh = packed_loader(shards, tok, proc)
    fresh.load_trained_state(after[k])
    assert fresh.dataset.start_window() == after[k]["consumed"] // 12 > 0
    rest = [i for b in fresh for row in b["ids"] for i in row]
    done = [i for b in batches[:k + 1] for row in b["ids"] for i in row]
    assert set(done) | set(rest) == set(i for b in batches for row in b["ids"] for i in row)
    assert not set(rest) >= set(done)  # finished windows are not trained again


def test_every_rank_finishes_the_same_windows_per_batch(shards, tok, proc):
    """Rank 0's checkpointed position holds for all ranks, with DataLoader workers too."""
    for workers in (0, 2):
        states = []
        for rank in range(2):
            dl = packed_loader(shards, tok, proc, dp_rank=rank, dp=2, workers=workers, window=8)
            per_batch = []
            for _ in dl:
                dl.mark_trained()
                per_batch.append(dl.trained_state())
            states.append(per_batch)
        assert states[0] == states[1] and len(states[0]) > 2
        assert len({s["consumed"] for s in states[0]}) > 2  # the position moves window by window


def test_end_of_epoch_position_resumes_at_the_next_epoch(shards, tok, proc):
    dl = packed_loader(shards, tok, proc)
    dl.load_trained_state({"epoch": 2, "consumed": 40, "seed": 3, "total": 40})
    assert dl.trained_state()["epoch"] == 3 and dl.dataset.sharded.consumed == 0
    assert dl.dataset.start_window() == 0 and dl.dataset.sharded.epoch == 3


def test_an_old_checkpoint_without_the_packed_position_is_refused_clearly(shards, tok, proc):
    from nemo_neva.checkpoint.data_position import restore_data_position

    dl = packed_loader(shards, tok, proc)
    with pytest.raises(ValueError, match="no packed-stream position .* start over"):
        restore_data_position(dl, {"consumed_samples": 16, "global_batch_size": 2}, 2)
    with pytest.raises(ValueError, match="other shards or another seed"):  # saved for other data
        restore_data_position(dl, {"consumed_samples": 16, "global_batch_size": 2,
                                   "packed": {"epoch": 0, "consumed": 12, "seed": 4, "total": 40}}, 2)


def test_a_packed_run_checkpoint_resumed_unpacked_is_flagged(shards, tok, proc, caplog):
    from nemo_neva.checkpoint.data_position import restore_data_position
    from nemo_neva.data.shards import ShardedLoader

    ds = shard_dataset(shards, tok, proc, template="plain", seq_length=SEQ, tokens_per_image=4, seed=3,
                            drop_remainder=True)
    state = {"consumed_samples": 4, "global_batch_size": 2,
             "packed": {"epoch": 0, "consumed": 12, "seed": 3, "total": 40}}
    with caplog.at_level("WARNING", logger="nemo_neva.checkpoint.data_position"):
        restore_data_position(ShardedLoader(ds, batch_size=2), state, 2)
    assert "counts packed rows" in caplog.text and ds.consumed == 4  # placed by consumed_samples, as before
