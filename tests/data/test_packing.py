"""Packing: every sample in exactly one bin, and the packed mask isolates samples exactly."""
import random

import pytest
import torch
import torch.nn.functional as F
from neva_data_helpers import conv, json_dataset, write_json

from nemo_neva.data.collate import NevaCollator
from nemo_neva.data.constants import IGNORE_INDEX
from nemo_neva.data.packing import PackedCollator, PackedNevaDataset, first_fit_decreasing


def test_ffd_bins_hold_every_sample_once():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = first_fit_decreasing(lengths, 100)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) <= 11 / 9 * sum(lengths) / 100 + 1  # FFD's guarantee vs the volume bound
    assert first_fit_decreasing([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]  # 6+4 | 5+3+2
    with pytest.raises(ValueError):
        first_fit_decreasing([11], 10)
    assert first_fit_decreasing([], 10) == []


def item(ids, image=None, sid=None):
    """An item with one image [3, H, W] (or a stack [n, 3, H, W]), or none."""
    ids = torch.tensor(ids)
    labels = ids.clone()
    labels[0] = IGNORE_INDEX
    images = None if image is None else (image if image.ndim == 4 else image.unsqueeze(0))
    return {"input_ids": ids, "labels": labels, "images": images, "id": sid}


def test_packed_collate_layout_and_mask():
    a, b, c = item([1, 2, 3, 4], torch.ones(3, 2, 2)), item([5, 6, 7]), item([8, 9], torch.zeros(3, 2, 2))
    out = PackedCollator(pad_id=0, seq_length=8)([[a, b], [c, None]])
    assert out["tokens"].tolist() == [[1, 2, 3, 5, 6, 0, 0, 0], [8, 0, 0, 0, 0, 0, 0, 0]]
    assert out["labels"].tolist() == [[2, 3, 4, 6, 7, 0, 0, 0], [9, 0, 0, 0, 0, 0, 0, 0]]
    assert out["loss_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert out["position_ids"][0, :5].tolist() == [0, 1, 2, 0, 1]  # restarts per sample
    assert out["cu_seqlens"].tolist() == [0, 3, 5, 8, 9, 16] and out["cu_seqlens"].dtype == torch.int32
    assert out["num_images"].tolist() == [1, 1] and out["images"][:, 0, 0, 0].tolist() == [1, 0]
    assert int(out["num_dropped"]) == 1
    mask = out["attention_mask"]
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    assert not mask[0, 0, 4, 3] and mask[0, 0, 3, 2] and mask[0, 0, 3, 4]  # same / other sample / future
    assert not mask.all(-1).any()  # no fully masked query row (padding attends to itself)


def test_mask_isolates_samples_in_attention():
    """Attention over a packed row equals attention over each sample alone."""
    torch.manual_seed(0)
    lens = [5, 3, 4]
    items = [item(list(range(1, n + 2))) for n in lens]  # n+1 ids -> n positions after the shift
    out = PackedCollator(pad_id=0, seq_length=14)([items])
    q, k, v = (torch.randn(1, 2, 14, 8) for _ in range(3))
    packed = F.scaled_dot_product_attention(q, k, v, attn_mask=~out["attention_mask"])
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        alone = F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True)
        torch.testing.assert_close(packed[:, :, sl], alone)
        start += n


def test_packed_dataset_end_to_end(tmp_path, image_dir, tok, proc):
    recs = [{"id": f"s{i}", "image": "red.png", "conversations": conv("<image>\n" + "q " * i, "red")}
            for i in range(9)] + [{"id": "t", "conversations": conv("hi", "hello")}]
    ds = json_dataset(write_json(tmp_path / "p.json", recs), str(image_dir), tok, proc, template="chatml",
                      seq_length=64, tokens_per_image=8)
    packed = PackedNevaDataset(ds, seq_length=64)
    assert sorted(i for b in packed.bins for i in b) == list(range(len(ds)))
    assert len(packed) < len(ds)
    rows = [packed[i] for i in range(len(packed))]
    out = PackedCollator(tok.pad_token_id, seq_length=64)(rows)
    plain = NevaCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    assert out["loss_mask"].sum() == plain["loss_mask"].sum()  # no target lost or added
    assert out["num_images"].sum() == 9 and out["images"].shape[0] == 9
    img_id = tok.convert_tokens_to_ids("<image>")
    assert ((out["tokens"] == img_id).sum(1) == out["num_images"] * 8).all()


def test_packed_seq_params_contract():
    """What the TE path gets from a packed batch: one THD row and cu_seqlens matching the collator's."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from nemo_neva.data.packing import cu_seqlens_from_segments, packed_seq_params, to_thd

    rows = [[item([1, 2, 3, 4]), item([5, 6, 7])], [item(list(range(10, 19)))], [item([8, 9])]]
    out = PackedCollator(pad_id=0, seq_length=8)(rows)
    # row 1 is exactly full (one segment id 0), row 2 starts with id 0 as well: still separate segments
    assert out["cu_seqlens"].tolist() == [0, 3, 5, 8, 16, 17, 24]
    assert torch.equal(cu_seqlens_from_segments(out["segment_ids"]), out["cu_seqlens"])
    params = packed_seq_params(out["segment_ids"])
    assert isinstance(params, PackedSeqParams) and params.qkv_format == "thd"
    assert params.cu_seqlens_q.dtype == torch.int32 and params.cu_seqlens_q.tolist() == out["cu_seqlens"].tolist()
    assert params.cu_seqlens_kv.tolist() == out["cu_seqlens"].tolist()
    assert params.max_seqlen_q == params.max_seqlen_kv == 8
    # without the rows' padding (one pipeline stage): 5 + 8 + 1 real tokens, the segments minus the padding
    assert out["row_tokens"].tolist() == [5, 8, 1]
    lean = to_thd(out, drop_padding=True)
    assert lean["tokens"].shape == (1, 14) and lean["tokens"][0, 5:13].tolist() == list(range(10, 18))
    assert lean["packed_seq_params"].cu_seqlens_q.tolist() == [0, 3, 5, 13, 14]
    assert lean["loss_mask"].shape == (1, 14) and lean["position_ids"][0, -2:].tolist() == [7, 0]
    with pytest.raises(ValueError, match="row_tokens"):
        to_thd({k: v for k, v in out.items() if k != "row_tokens"}, drop_padding=True)
    # micro-batch of the last two rows (as split_microbatches slices it): offsets restart at 0
    assert cu_seqlens_from_segments(out["segment_ids"][1:]).tolist() == [0, 8, 9, 16]
    thd = to_thd(out)
    assert thd["tokens"].shape == (1, 24) and thd["tokens"][0, 8:16].tolist() == list(range(10, 18))
    assert thd["position_ids"][0].tolist()[:8] == [0, 1, 2, 0, 1, 0, 1, 2]
    assert thd["attention_mask"] is None and out["attention_mask"] is not None  # the input is left alone


def test_thd_segment_lengths():
    from nemo_neva.modules.layer_specs import thd_segment_lengths

    cu = torch.tensor([0, 3, 5, 8], dtype=torch.int32)
    assert thd_segment_lengths(cu, cu) == [3, 2, 3]
    with pytest.raises(ValueError, match="cu_seqlens_q == cu_seqlens_kv"):
        thd_segment_lengths(cu, torch.tensor([0, 8], dtype=torch.int32))
