"""model.data.data_path naming shards makes the model stream them (ShardedLoader, or PackedShardLoader with
packed_sequence) instead of NevaDataset."""
import json
import os

import pytest

from nemo_neva import build_model
import torch

from nemo_neva.data.packed_shards import PackedShardLoader
from nemo_neva.data.shards import ShardedLoader, ShardedNevaDataset
from neva_data_helpers import REPO, write_json
from scripts.convert_llava_to_shards import main as convert_main
from tests.model.helpers import tiny_model_cfg

DEMO = os.path.join(REPO, "data", "shapes_demo")


def test_model_streams_shards(tmp_path):
    with open(os.path.join(DEMO, "stage1_captions.json")) as f:
        src = write_json(tmp_path / "slice.json", json.load(f)[:20])
    out = str(tmp_path / "out")
    assert convert_main(["--data-path", src, "--image-folder", os.path.join(DEMO, "images"),
                         "--output-dir", out, "--samples-per-shard", "8"]) == 0
    pattern = os.path.join(out, "shard-{000000..000002}.tar")
    cfg = tiny_model_cfg(**{"data.data_path": pattern, "data.validation_data_path": out,
                            "data.shuffle_buffer": 4})
    model = build_model(cfg)
    model.setup_training_data(cfg.data)
    train, val = model._train_dl, model._validation_dl
    assert isinstance(train, ShardedLoader) and isinstance(model._train_ds, ShardedNevaDataset)
    assert model._train_ds.shuffle and not model._validation_ds.shuffle
    batches = list(train)
    assert len(batches) == len(train) == 20 // cfg.global_batch_size  # the remainder is dropped in training
    assert all(b["tokens"].shape[0] == cfg.global_batch_size and b["images"].shape[0] == cfg.global_batch_size
               for b in batches)
    assert sum(len(b["ids"]) for b in val) == 20  # evaluation serves every sample
    assert model._train_ds.epoch == 1
    cfg.data.packed_sequence = True  # packing windows of the stream (data/packed_shards.py)
    cfg.data.pack_window = 10
    packed = model.data_loader(model._train_ds, cfg.data, shuffle=True)
    assert isinstance(packed, PackedShardLoader)
    batches = list(packed)
    served = [i for b in batches for row in b["ids"] for i in row]
    assert len(set(served)) == len(served) >= 20 - cfg.global_batch_size  # rows of a partial last batch dropped
    assert all(len(row) >= 1 for row in batches[0]["ids"]) and "segment_ids" in batches[0]
    loss, tokens = model.loss_from_batch(batches[0])
    assert torch.isfinite(loss) and tokens > 0
