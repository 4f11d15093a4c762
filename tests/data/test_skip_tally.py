"""Skips counted in DataLoader workers reach the main process and the logged total (summed over DP)."""
import io
import os

import pytest
import torch
from PIL import Image

from nemo_neva.data.shard_writer import convert_to_shards
from nemo_neva.data.skip_tally import SkipTally
from neva_data_helpers import conv, write_json


def _records(tmp_path, n_good):
    """n_good good samples, 2 bad in the text (found by NevaDataset's scan), 2 with a truncated image whose
    header is fine (found only when the pixels are decoded, i.e. in a worker)."""
    images = tmp_path / "img"
    images.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(images / "red.png")
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="PNG")
    (images / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    good = [{"id": f"g{i}", "image": "red.png", "conversations": conv("<image>\nwhat?", f"red {i}")}
            for i in range(n_good)]
    bad_text = [{"id": "reply_tag", "image": "red.png", "conversations": conv("<image>\nq", "a <image>")},
                {"id": "two_tags", "image": "red.png", "conversations": conv("<image> <image>\nq", "a")}]
    bad_pixels = [{"id": f"trunc{i}", "image": "trunc.png", "conversations": conv("<image>\nq", "a")}
                  for i in range(2)]
    recs = good[:5] + bad_text[:1] + bad_pixels[:1] + good[5:9] + bad_text[1:] + bad_pixels[1:] + good[9:]
    return recs, str(images)


@pytest.mark.parametrize("source", ["json", "shards"])
def test_logged_skips_equal_bad_records_with_two_workers(tmp_path, source):
    from nemo_neva import build_model
    from tests.model.helpers import tiny_model_cfg

    # 16 rows reach the loader either way (2 full batches of 8; training drops a partial one)
    recs, images = _records(tmp_path, 14 if source == "json" else 12)
    path = write_json(tmp_path / "d.json", recs)
    if source == "shards":  # header-only check at conversion, so the truncated images get into the shards
        path = str(tmp_path / "shards")
        index = convert_to_shards(write_json(tmp_path / "d.json", recs), images, path, samples_per_shard=5,
                                  full_decode=False)
        assert index["total"] == 16
    cfg = tiny_model_cfg(**{"data.data_path": path, "data.image_folder": images, "data.num_workers": 2,
                            "data.conv_template": "chatml", "data.shuffle_buffer": 4})
    model = build_model(cfg)
    model.setup_training_data(cfg.data)
    assert sum(model._train_ds.prescan_skips.values()) == (2 if source == "json" else 0)
    logged = []
    model.log = lambda name, value, **kw: logged.append((name, value))  # capture what training_step logs
    rows = 0
    for batch in model._train_dl:
        rows += batch["tokens"].shape[0]
        model._log_data_skips(batch, batch["tokens"].shape[0])
    assert rows == 16  # the truncated images arrive as empty rows
    assert logged and logged[-1] == ("data_skipped", 4.0)
    counts = model._skip_tally.global_counts()
    assert counts["image_corrupt"] == 2 and counts["image_tag_in_reply"] == counts["image_count_mismatch"] == 1
    assert sum(model._train_ds.skip_counts.values()) == (2 if source == "json" else 0)  # workers' copies differ


def _dp_worker(rank, world, port, out):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    tally = SkipTally({"prescan": 2})  # the same on both ranks: counted once
    tally.add({"skips": {"image_corrupt": rank + 1}})
    tally.add({"skips": {}})
    tally.add({"tokens": None})
    counts = tally.global_counts(torch.distributed.group.WORLD)
    torch.save(dict(counts), os.path.join(out, f"{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_skip_tally_sums_over_data_parallel_ranks(tmp_path):
    from nemo_neva.parallel.init import free_port

    torch.multiprocessing.spawn(_dp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(tmp_path / f"{rank}.pt") == {"prescan": 2, "image_corrupt": 3}


def test_end_of_training_reports_skips_by_reason_and_warns_with_the_fix(tmp_path, caplog):
    """3 of 10 samples whose image tokens end past the context are lost: the end-of-training report says so
    as a warning naming the setting to change; 1 of 60 lost stays an info line."""
    import logging

    from nemo_neva import build_model
    from nemo_neva.data.skip_tally import skip_report
    from tests.model.helpers import tiny_model_cfg

    images = tmp_path / "img"
    images.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(images / "red.png")
    long_question = " ".join(["word"] * 80) + " <image>"  # the 16 image tokens start beyond 64 tokens
    recs = [{"id": f"ok{i}", "image": "red.png", "conversations": conv("<image>\nwhat?", "red")} for i in range(7)]
    recs += [{"id": f"long{i}", "image": "red.png", "conversations": conv(long_question, "red")} for i in range(3)]
    cfg = tiny_model_cfg(**{"data.data_path": write_json(tmp_path / "d.json", recs), "data.image_folder": str(images),
                            "data.conv_template": "chatml"})
    model = build_model(cfg)
    model.setup_training_data(cfg.data)
    with caplog.at_level(logging.INFO):
        model.on_train_end()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipped" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "skipped 3 of 10 samples (30.0 %): image_does_not_fit=3" in warnings[0]
    assert "raise model.encoder_seq_length" in warnings[0]
    line, loud = skip_report({"image_corrupt": 1}, 60)
    assert not loud and line == "skipped 1 of 60 samples (1.7 %): image_corrupt=1"
