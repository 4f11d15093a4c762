"""Weighted blends of shard sources: proportions, determinism, reach, exactly-once split over dp x workers,
resume, packing, and the model's data_path forms."""
import itertools
import json
import os
from collections import Counter

import pytest

from neva_data_helpers import REPO, shard_dataset, write_json
from nemo_neva.data.blended_shards import BlendedShardedDataset
from nemo_neva.data.packed_shards import PackedShardDataset
from nemo_neva.data.shard_writer import convert_to_shards
from nemo_neva.data.shards import ShardedLoader

DEMO = os.path.join(REPO, "data", "shapes_demo")
KW = dict(template="plain", seq_length=64, tokens_per_image=4, shuffle_buffer=4, seed=5)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Shard folders A (30 samples, shards of 8) and B (6 samples, shards of 4), ids a*/b*."""
    tmp = tmp_path_factory.mktemp("blend")
    with open(os.path.join(DEMO, "stage1_captions.json")) as f:
        records = json.load(f)
    out = {}
    for name, n, per in (("a", 30, 8), ("b", 6, 4)):
        recs = [dict(r, id=f"{name}{i}") for i, r in enumerate(records[:n])]
        out[name] = str(tmp / name)
        convert_to_shards(write_json(tmp / f"{name}.json", recs), os.path.join(DEMO, "images"), out[name],
                          samples_per_shard=per)
    return out


def blend(sources, tok, proc, weights=(0.5, 0.5), **kw):
    srcs = [shard_dataset(sources[n], tok, proc, **KW, **kw) for n in ("a", "b")]
    return BlendedShardedDataset(srcs, list(weights), names=["a", "b"])


def ids(ds, batch_size=1, workers=0, batches=None):
    dl = ShardedLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=lambda b: [it["id"] for it in b])
    return [i for b in itertools.islice(dl, batches) for i in b]


def test_blend_of_shards_proportions_determinism_reach(sources, tok, proc):
    ds = blend(sources, tok, proc, weights=(0.7, 0.3))
    assert ds.total == 36 and len(ds) == 36
    got = ids(ds)
    per = Counter(i[0] for i in got)
    assert abs(per["a"] - 0.7 * 36) <= 1 and abs(per["b"] - 0.3 * 36) <= 1
    assert {i for i in got if i[0] == "b"} == {f"b{k}" for k in range(6)}  # oversampled b: all reached
    assert len({i for i in got if i[0] == "a"}) == per["a"]  # undersampled a: no repeats within the epoch
    assert ids(blend(sources, tok, proc, weights=(0.7, 0.3))) == got  # same seed, same stream
    assert ds.epoch == 1 and ids(ds) != got  # the next epoch has another order
    ds.shuffle = False  # evaluation: the sources stream in file order
    ordered = ids(ds)
    assert [i for i in ordered if i[0] == "a"] == [f"a{k}" for k in range(per["a"])]


def test_blend_of_shards_split_over_ranks_and_workers(sources, tok, proc):
    ref = ids(blend(sources, tok, proc))
    union = []
    for rank in range(2):
        union += ids(blend(sources, tok, proc, dp_rank=rank, dp_size=2), batch_size=3, workers=2)
    assert Counter(union) == Counter(ref)


def test_blend_of_shards_resume_and_packing(sources, tok, proc):
    full = ids(blend(sources, tok, proc), batch_size=4)
    ds = blend(sources, tok, proc)
    first = ids(ds, batch_size=4, batches=3)
    state = ds.state_dict()
    again = blend(sources, tok, proc)
    again.load_state_dict(state)
    assert first + ids(again, batch_size=4) == full
    rows = list(PackedShardDataset(blend(sources, tok, proc), seq_length=64, window=10))
    assert Counter(it["id"] for r in rows for it in r) == Counter(full)


def test_model_builds_shard_blends(sources, tmp_path):
    from nemo_neva import build_model
    from tests.model.helpers import tiny_model_cfg

    cfg = tiny_model_cfg(**{"data.data_path": [2, sources["a"], 1, sources["b"]]})
    model = build_model(cfg)
    ds = model.build_dataset(cfg.data)
    assert isinstance(ds, BlendedShardedDataset) and ds.counts() == {sources["a"]: 24, sources["b"]: 12}
    mixed = [1, sources["a"], 1, os.path.join(DEMO, "stage1_captions.json")]
    with pytest.raises(ValueError, match="mixes tar shards and JSON"):
        model.build_dataset(cfg.data, mixed)
