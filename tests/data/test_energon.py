"""Megatron-Energon datasets (nemo_neva/data/energon.py): tiny datasets written by
scripts/convert_llava_to_energon.py and prepared by Energon's own `energon prepare`, read through Energon's
loader and our task encoder into nemo_neva batches (stage 1 captions, stage 2 multi-turn), blended by a
metadataset, packed, with bad samples counted as skips, and the loader state saved and restored."""
import io
import json
import os
import tarfile

import pytest
import torch

from tests.optional import require

require("megatron.energon")

from nemo_neva import build_model  # noqa: E402
from nemo_neva.data.energon import (EnergonLoader, EnergonSource, from_plain, is_energon_path,  # noqa: E402
                                    sample_to_record, to_plain)
from neva_data_helpers import REPO, conv, json_dataset, write_json  # noqa: E402
from scripts.convert_llava_to_energon import convert  # noqa: E402
from tests.model.helpers import tiny_model_cfg  # noqa: E402

DEMO = os.path.join(REPO, "data", "shapes_demo")
IMAGES = os.path.join(DEMO, "images")


def _records(name, n, prefix=None):
    with open(os.path.join(DEMO, name)) as f:
        recs = json.load(f)[:n]
    return [dict(r, id=f"{prefix}{i:03d}") for i, r in enumerate(recs)] if prefix else recs


def _energon(tmp_path, name, records, sample_type="auto", per_shard=5):
    src = write_json(tmp_path / f"{name}.json", records)
    out = str(tmp_path / name)
    index = convert(src, IMAGES, out, samples_per_shard=per_shard, sample_type=sample_type, workers=1)
    return out, index


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    return _energon(tmp_path_factory.mktemp("e1"), "captions", _records("stage1_captions.json", 24))


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    return _energon(tmp_path_factory.mktemp("e2"), "instruct", _records("stage2_instruct.json", 24))


def _model(data_path, **overrides):
    cfg = tiny_model_cfg(**{"data.data_path": data_path, "data.shuffle_buffer": 4, **overrides})
    model = build_model(cfg)
    model.setup_training_data(cfg.data)
    return model, cfg


def _same_rows_as_json_path(model, cfg, batch, source, template):
    """Each row's tokens, labels and loss mask equal what the JSON path (NevaDataset + NevaCollator) makes of
    the same LLaVA record: one encoding, whichever reader."""
    from nemo_neva.data.collate import NevaCollator

    ref = json_dataset(os.path.join(DEMO, source), IMAGES, model.tokenizer, model.image_processor,
                       template=template, seq_length=cfg.encoder_seq_length, tokens_per_image=model.tokens_per_image)
    pos = {r["id"]: k for k, r in enumerate(ref.records)}
    want = NevaCollator(model.tokenizer.pad_token_id)([ref[pos[i]] for i in batch["ids"]])
    for key in ("tokens", "labels", "loss_mask", "images"):
        torch.testing.assert_close(batch[key], want[key], rtol=0, atol=0, msg=key)


def test_converter_output_is_a_prepared_energon_dataset(stage1, stage2):
    from megatron.energon.flavors.webdataset.metadata import get_dataset_info

    for (path, index), kind in ((stage1, "CaptioningSample"), (stage2, "VQASample")):
        assert index["sample_type"] == kind and index["total"] == 24
        assert is_energon_path(path) and os.path.isfile(os.path.join(path, ".nv-meta", "index.sqlite"))
        info = get_dataset_info(__import__("megatron.energon.epathlib", fromlist=["EPath"]).EPath(path))
        assert sum(info["shard_counts"].values()) == 24  # counted by energon prepare, not by us
        assert f"__class__: {kind}" in open(os.path.join(path, ".nv-meta", "dataset.yaml")).read()
    assert not is_energon_path(os.path.join(DEMO, "stage1_captions.json"))


def test_sample_to_record_maps_energon_sample_types():
    from megatron.energon import CaptioningSample, VQASample

    common = dict(__key__="k", __restore_key__=(), __subflavors__={}, __sources__=())
    rec, img, _ = sample_to_record(CaptioningSample(**common, image=b"png", caption="a red square"))
    assert rec["conversations"] == conv("<image>", "a red square") and img == [b"png"] and rec["image"] == "k"
    rec, _, _ = sample_to_record(VQASample(**common, image=b"x", context=["<image>\nq1", "q2"], answers=["a1", "a2"]))
    assert rec["conversations"] == conv("<image>\nq1", "a1", "q2", "a2")
    rec, _, _ = sample_to_record(VQASample(**common, image=None, context="what?", answers=["no", "yes"],
                                           answer_weights=torch.tensor([0.2, 0.8])))
    assert rec["conversations"] == conv("what?", "yes") and "image" not in rec


def test_stage1_batches_from_energon(stage1):
    model, cfg = _model(stage1[0])
    dl = model._train_dl
    assert isinstance(dl, EnergonLoader) and isinstance(model._train_ds, EnergonSource)
    assert len(dl) == 24 // cfg.global_batch_size
    it = iter(dl)
    batches = [next(it) for _ in range(6)]
    ids = [i for b in batches for i in b["ids"]]
    # Energon's stream repeats and its shuffle buffer (4 here) reaches across the pass boundary, so a "pass"
    # of 24 draws holds at least 24 - 4 different samples, and two passes hold all of them
    assert len(set(ids[:24])) >= 20 and len(set(ids)) == 24
    b = batches[0]
    assert b["tokens"].shape[0] == cfg.global_batch_size and b["images"].shape[0] == cfg.global_batch_size
    assert int(b["num_dropped"]) == 0 and (b["num_images"] == 1).all()
    _same_rows_as_json_path(model, cfg, b, "stage1_captions.json", "plain")
    loss, tokens = model.loss_from_batch(b)
    assert torch.isfinite(loss) and tokens > 0


def test_stage2_multiturn_batches_from_energon(stage2):
    model, cfg = _model(stage2[0], **{"data.conv_template": "nvgpt", "encoder_seq_length": 256})
    b = next(iter(model._train_dl))
    assert b["tokens"].shape[0] == cfg.global_batch_size and int(b["num_dropped"]) == 0
    _same_rows_as_json_path(model, cfg, b, "stage2_instruct.json", "nvgpt")
    # several assistant replies are trainable in a row: multi-turn, not only the first exchange
    spans = (b["loss_mask"][:, 1:] - b["loss_mask"][:, :-1] == 1).sum(1)
    assert spans.max() >= 2
    loss, _ = model.loss_from_batch(b)
    assert torch.isfinite(loss)


def test_packed_rows_from_energon(stage1):
    model, cfg = _model(stage1[0], **{"data.packed_sequence": True, "data.pack_window": 8})
    b = next(iter(model._train_dl))
    assert "segment_ids" in b and b["tokens"].shape == (cfg.global_batch_size, cfg.encoder_seq_length)
    assert all(len(row) >= 2 for row in b["ids"])  # several samples share a row
    loss, tokens = model.loss_from_batch(b)
    assert torch.isfinite(loss) and tokens > 0


def test_bad_samples_are_counted_skips(tmp_path):
    recs = _records("stage2_instruct.json", 16)
    recs[3] = dict(recs[3], conversations=[{"from": "human", "value": "<image>\nq"}])  # no reply to train on
    turns = [dict(t) for t in recs[7]["conversations"]]
    turns[0]["value"] += "\n<image>"  # a second <image> tag for one image
    recs[7] = dict(recs[7], conversations=turns)
    path, _ = _energon(tmp_path, "bad", recs, sample_type="vqa", per_shard=4)
    # one image whose bytes are not an image: rewrite its member in the shard (convert checked it before)
    shard = os.path.join(path, "shard-000002.tar")
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(shard, "w") as tf:
        for m, data in members:
            if m.name.endswith(".png") and m.name.startswith("000000009"):
                data = b"\x89PNG broken" + b"\0" * (len(data) - 11)
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    model, cfg = _model(path, **{"data.conv_template": "nvgpt", "encoder_seq_length": 128,
                                 "global_batch_size": 4, "micro_batch_size": 4})
    it = iter(model._train_dl)
    seen = []
    for _ in range(3):  # 13 good samples: 3 full batches of 4 within the first pass
        b = next(it)
        assert b["tokens"].shape[0] == 4 and int(b["num_dropped"]) == 0  # Energon refills the batch
        seen += b["ids"]
        model._skip_tally.add(b)
    counts = model._skip_tally.global_counts()
    assert sum(counts.values()) >= 1
    assert not {"inst_00003", "inst_00007", "inst_00009"} & set(seen)
    for _ in range(4):
        model._skip_tally.add(next(it))
    counts = model._skip_tally.global_counts()
    assert counts["no_trainable_tokens"] >= 1 and counts["image_count_mismatch"] >= 1 and counts["image_corrupt"] + counts["image_bad_format"] >= 1
    cfg.data.strict = True
    strict = build_model(cfg)
    strict.setup_training_data(cfg.data)
    with pytest.raises(Exception, match="no_trainable_tokens|image_count_mismatch|image_(corrupt|bad_format)"):
        it = iter(strict._train_dl)
        for _ in range(8):
            next(it)


def test_metadataset_blend_follows_the_weights(tmp_path):
    """Two datasets blended 3:1 by a metadataset YAML: the measured share of dataset A over 40 batches of 8
    (320 draws) is 0.75 within 0.08. Energon draws each sample's source independently with these weights
    (a weighted random choice per sample), so the share is binomial: sd = sqrt(0.75 * 0.25 / 320) = 0.024,
    and 0.08 is > 3 sd -- the test fails by chance less than once in a thousand seeds (and the seed is fixed)."""
    a, _ = _energon(tmp_path, "a", _records("stage1_captions.json", 24, prefix="a_"))
    b, _ = _energon(tmp_path, "b", _records("stage1_captions.json", 24, prefix="b_"))
    meta = tmp_path / "blend.yaml"
    meta.write_text("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n    blend:\n"
                    f"      - weight: 3\n        path: {a}\n      - weight: 1\n        path: {b}\n")
    assert is_energon_path(str(meta))
    model, _ = _model(str(meta))
    it = iter(model._train_dl)
    ids = [i for _ in range(40) for i in next(it)["ids"]]
    share = sum(i.startswith("a_") for i in ids) / len(ids)
    assert abs(share - 0.75) < 0.08, share


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_roundtrip_continues_exactly(stage1, workers):
    """Save after 2 trained batches with more prefetched (as Lightning does), restore in a fresh loader: the
    next batches are the uninterrupted loader's; the state survives torch.save / weights_only load. With 2
    DataLoader workers the state comes from the workers (Energon's worker checkpoints)."""
    model, cfg = _model(stage1[0], **{"data.num_workers": workers})
    dl = model._train_dl
    it = iter(dl)
    ref = []
    for k in range(6):
        ref.append(next(it)["ids"])
        if k < 2:
            dl.mark_trained()
    # trained 2, fetched 6: the state is the one after batch 2
    buf = io.BytesIO()
    torch.save({"energon": [dl.energon_state()]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)["energon"]
    fresh, _ = _model(stage1[0], **{"data.num_workers": workers})
    from nemo_neva.checkpoint.data_position import restore_data_position

    restore_data_position(fresh._train_dl, {"consumed_samples": 16, "global_batch_size": 8, "energon": saved}, 8)
    it2 = iter(fresh._train_dl)
    assert [next(it2)["ids"] for _ in range(4)] == ref[2:6]
    with pytest.raises(ValueError, match="no Energon data position"):
        restore_data_position(fresh._train_dl, {"consumed_samples": 16, "global_batch_size": 8}, 8)


def test_plain_state_refuses_foreign_classes():
    assert from_plain(to_plain({"a": (1, b"x"), "b": [None]})) == {"a": (1, b"x"), "b": [None]}
    with pytest.raises(ValueError, match="not an Energon state class"):
        from_plain({"__energon__": "os:system", "fields": {}})
