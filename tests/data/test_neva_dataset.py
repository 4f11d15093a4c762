"""NevaDataset: placeholder runs, truncation, and every skip reason counted (or raised in strict mode)."""
import logging

import pytest
import torch
from tokenizers import normalizers

from neva_data_helpers import DEMO_TOKENIZER, conv, json_dataset, write_json
from neva_image_helpers import bomb_png, truncated_png
from nemo_neva.data.collate import NevaCollator
from nemo_neva.data.constants import IGNORE_INDEX, IMAGE_TOKEN
from nemo_neva.data.dataset import SampleError

GOOD = {"id": "good", "image": "red.png", "conversations": conv("<image>\nColour?", "red")}


def bad_records():
    long_q = "why " * 200
    return [
        GOOD,
        {"id": "missing", "image": "nope.png", "conversations": conv("<image>\nQ", "A")},
        {"id": "bomb", "image": "bomb.png", "conversations": conv("<image>\nQ", "A")},
        {"id": "escape", "image": "../outside.png", "conversations": conv("<image>\nQ", "A")},
        '{"id": "broken", "conversations": [',
        {"id": "robot", "conversations": [{"from": "robot", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"id": "notrain", "conversations": conv(long_q, "A")},
        {"id": "nofit", "image": "red.png", "conversations": conv(long_q + "<image>", "A")},
        {"id": "twoimg", "image": "red.png", "conversations": conv("<image><image>", "A")},
        {"id": "corrupt", "image": "bad.png", "conversations": conv("<image>\nQ", "A")},
    ]


@pytest.fixture
def bad_set(tmp_path, image_dir):
    (image_dir / "bomb.png").write_bytes(bomb_png(6000, 6000))
    (image_dir / "bad.png").write_bytes(truncated_png())
    (tmp_path / "outside.png").write_bytes((image_dir / "red.png").read_bytes())
    return write_json(tmp_path / "d.jsonl", bad_records(), jsonl=True), str(image_dir)


def make(path, folder, tok, proc, **kw):
    kw.setdefault("template", "vicuna_v1")
    kw.setdefault("seq_length", 128)
    kw.setdefault("tokens_per_image", 8)
    return json_dataset(path, folder, tok, proc, **kw)


def test_every_skip_reason_is_counted(bad_set, tok, proc, caplog):
    with caplog.at_level(logging.WARNING):
        ds = make(*bad_set, tok, proc)
    assert dict(ds.skip_counts) == {
        "image_missing": 1, "image_too_many_pixels": 1, "image_path_escape": 1, "malformed_json": 1,
        "unknown_role": 1, "no_trainable_tokens": 1, "image_does_not_fit": 1, "image_count_mismatch": 1}
    assert [r["id"] for r in ds.records] == ["good", "corrupt"]
    assert "'robot'" in caplog.text and "'escape'" in caplog.text and "d.jsonl:5" in caplog.text
    # the corrupt image passes the header scan; decoding fails in __getitem__ -> None, counted
    assert ds[1] is None and ds.skip_counts["image_corrupt"] == 1
    assert "image_corrupt=1" in ds.summary() and "kept 2/10" in ds.summary()
    batch = NevaCollator(tok.pad_token_id)([ds[0], ds[1]])
    assert int(batch["num_dropped"]) == 1 and batch["images"].shape[0] == 1


@pytest.mark.parametrize("sid,reason,named", [("missing", "image_missing", "'missing'"),
                                              ("broken", "malformed_json", "'s.jsonl:2'"),
                                              ("robot", "unknown_role", "'robot'")])
def test_strict_raises_naming_the_sample(sid, reason, named, tmp_path, image_dir, tok, proc):
    recs = [GOOD] + [r for r in bad_records() if sid in (r if isinstance(r, str) else r["id"])]
    path = write_json(tmp_path / "s.jsonl", recs, jsonl=True)
    with pytest.raises(SampleError, match=reason) as e:
        make(path, str(image_dir), tok, proc, strict=True)
    assert str(e.value).startswith(f"sample {named}: {reason}: ") and isinstance(e.value, ValueError)


def test_strict_getitem_raises(bad_set, tok, proc):
    ds = make(*bad_set, tok, proc)
    ds.strict = True
    with pytest.raises(SampleError, match="'corrupt'.*image_corrupt"):
        ds[1]


def test_tokenization_mismatch_is_skipped(tmp_path, image_dir, tok, proc):
    from nemo_neva.data.tokenizer import load_tokenizer

    lower = load_tokenizer(DEMO_TOKENIZER)
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()  # decode no longer gives the text back
    path = write_json(tmp_path / "m.json", [{"id": "caps", "conversations": conv("HELLO", "World")},
                                            {"id": "ok", "conversations": conv("hello", "world")}])
    ds = make(path, None, lower, proc, template="chatml")
    assert dict(ds.skip_counts) == {"tokenization_mismatch": 1} and len(ds) == 1


def test_image_run_and_llava_tag_insertion(tmp_path, image_dir, tok, proc):
    recs = [{"id": "notag", "image": "blue.png", "conversations": conv("What is it?", "blue")},
            {"id": "text", "conversations": conv("Hi", "Hello")}]
    path = write_json(tmp_path / "t.json", recs)
    ds = make(path, str(image_dir), tok, proc, tokens_per_image=7, image_aspect_ratio="pad")
    item = ds[0]
    img_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    pos = (item["input_ids"] == img_id).nonzero().flatten()
    assert len(pos) == 7 and pos[-1] - pos[0] == 6  # one contiguous run
    assert (item["labels"][pos] == IGNORE_INDEX).all()
    text = tok.decode(item["input_ids"][: pos[0] + 1]) + tok.decode(item["input_ids"][pos[-1] + 1:])
    assert "USER: <image>\nWhat is it? ASSISTANT: blue</s>" in text  # tag put first, LLaVA-style
    assert item["images"].shape == (1, 3, 32, 32) and item["id"] == "notag"
    assert ds[1]["images"] is None and img_id not in ds[1]["input_ids"]


def test_truncation_keeps_image_and_length(tmp_path, image_dir, tok, proc):
    long_answer = "red " * 300
    path = write_json(tmp_path / "t.json",
                      [{"id": "long", "image": "red.png", "conversations": conv("<image>", long_answer)}])
    ds = make(path, str(image_dir), tok, proc, template="plain", seq_length=64, tokens_per_image=10)
    item = ds[0]
    assert len(item["input_ids"]) == 64 == ds.lengths[0] and ds.truncated == 1
    assert (item["labels"][10:] != IGNORE_INDEX).all() and (item["labels"][:10] == IGNORE_INDEX).all()


def test_multiple_files_json_and_jsonl(tmp_path, image_dir, tok, proc):
    a = write_json(tmp_path / "a.json", [GOOD])
    b = write_json(tmp_path / "b.jsonl", [dict(GOOD, id="g2"), {"conversations": conv("q", "a")}], jsonl=True)
    ds = make([a, b], str(image_dir), tok, proc)
    assert [r["id"] for r in ds.records] == ["good", "g2", "b.jsonl:2"]
    with pytest.raises(ValueError, match="not valid JSON"):
        make((tmp_path / "c.json").write_text("[{") and str(tmp_path / "c.json"), str(image_dir), tok, proc)


def test_all_skipped_is_an_error(tmp_path, image_dir, tok, proc):
    path = write_json(tmp_path / "x.json", [{"id": "m", "image": "nope.png", "conversations": conv("q", "a")}])
    with pytest.raises(ValueError, match="no usable samples.*image_missing=1"):
        make(path, str(image_dir), tok, proc)


def test_dataloader_with_workers(tmp_path, image_dir, tok, proc):
    recs = [dict(GOOD, id=f"s{i}") for i in range(6)] + [{"id": "t", "conversations": conv("q", "a")}]
    ds = make(write_json(tmp_path / "w.json", recs), str(image_dir), tok, proc)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=NevaCollator(tok.pad_token_id))
    batches = list(dl)
    assert [b["tokens"].shape[0] for b in batches] == [4, 3]
    assert batches[1]["num_images"].tolist() == [1, 1, 0] and batches[1]["images"].shape == (2, 3, 32, 32)


def test_forked_workers_do_not_deadlock_without_tokenizers_env(tmp_path, image_dir):
    """conftest sets TOKENIZERS_PARALLELISM=false; real users usually do not. Batch encodes inside forked
    workers (parent's tokenizers pool already started) used to hang forever."""
    import os
    import subprocess
    import sys

    from neva_data_helpers import REPO

    path = write_json(tmp_path / "w.json", [dict(GOOD, id=f"s{i}") for i in range(8)])
    code = f"""
import torch
from transformers import CLIPImageProcessor
from nemo_neva.data.collate import NevaCollator
from nemo_neva.data.dataset import NevaDataset
from nemo_neva.data.processor import NevaProcessor
from nemo_neva.data.settings import DatasetSettings
from nemo_neva.data.tokenizer import load_tokenizer
tok = load_tokenizer({DEMO_TOKENIZER!r})
tok(["warm", "the", "thread", "pool"] * 64)
proc = CLIPImageProcessor(size={{"shortest_edge": 32}}, crop_size={{"height": 32, "width": 32}})
ds = NevaDataset({path!r}, NevaProcessor(tok, proc, tokens_per_image=4),
                 DatasetSettings(seq_length=64, template="chatml", image_folder={str(image_dir)!r}))
dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=NevaCollator(0))
print("batches", len(list(dl)))
"""
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=90)
    assert "batches 4" in res.stdout, res.stderr[-2000:]
