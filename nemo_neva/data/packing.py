"""Sequence packing: several samples share one row of `seq_length` tokens, isolated by the mask.

First-fit-decreasing over the samples' (shifted) lengths; a segment tree finds the first bin with
room in O(log n), so LLaVA-665K-sized sets pack in seconds.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from nemo_neva.data.collate import NevaCollator, item_frames, new_skips


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices; every index appears in exactly one bin, each bin sums to <= capacity."""
    if any(n > capacity or n < 0 for n in lengths):
        raise ValueError(f"a length exceeds the bin capacity {capacity}")
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    tree = [capacity] * (2 * size)  # max free space per subtree; leaves are (possibly unopened) bins
    bins: list[list[int]] = []
    # Longest first; ties by index keeps the result deterministic.
    for idx in sorted(range(n), key=lambda i: (-lengths[i], i)):
        need, node = lengths[idx], 1
        while node < size:  # descend to the leftmost leaf with enough room
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(idx)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


class PackedNevaDataset(Dataset):
    """Items are lists of NevaDataset items (one list = one packed row); dropped samples are left out."""

    def __init__(self, dataset, seq_length: int):
        # A sample of L ids gives L-1 (input, target) positions after the shift.
        self.dataset, self.seq_length = dataset, seq_length
        self.bins = first_fit_decreasing([max(n - 1, 0) for n in dataset.lengths], seq_length)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, idx: int) -> list:
        return [self.dataset[i] for i in self.bins[idx]]

    def take_new_skips(self):
        return self.dataset.take_new_skips()

    def summary(self) -> str:
        return f"{len(self.bins)} packed rows; {self.dataset.summary()}"


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B,S] segment ids -> [B,1,S,S] bool, True = masked (megatron): causal within a segment only."""
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    causal = torch.ones(segment_ids.shape[1], segment_ids.shape[1], dtype=torch.bool).tril()
    return ~(same & causal).unsqueeze(1)


class PackedCollator:
    """Packed rows -> NevaCollator's keys + `attention_mask` (CPU path) + `cu_seqlens` (TE path).

    Each row is padded to `seq_length` (or the longest row); padding is its own segment so no attention
    row is fully masked, and `row_tokens` [B] counts each row's tokens before it (`to_thd` can drop it).
    `cu_seqlens` (int32) are offsets into the flattened [B*S] tokens, padding segments included, as
    TransformerEngine's THD format expects.
    """

    def __init__(self, pad_id: int, seq_length: int | None = None,
                 skip_source: Callable[[], Mapping[str, int]] | None = None):
        self.pad_id, self.seq_length = int(pad_id), seq_length
        self.skip_source = skip_source  # as in NevaCollator
        self._flat = NevaCollator(pad_id)

    def __call__(self, rows: Sequence[list]) -> dict:
        # packed shard rows (packed_shards.PackedRow) say which window they finish, for the position
        windows_done = [w for w in (getattr(r, "window_done", None) for r in rows) if w is not None]
        dropped = sum(it is None for row in rows for it in row)
        rows = [[it for it in row if it is not None] for row in rows]
        per_row = [self._flat(row) if row else None for row in rows]
        lens = [[len(it["input_ids"]) - 1 for it in row] for row in rows]
        seq = self.seq_length or max([sum(x) for x in lens] + [1])
        bsz = len(rows)
        out = {k: torch.zeros(bsz, seq, dtype=dt) for k, dt in
               [("labels", torch.long), ("loss_mask", torch.float), ("position_ids", torch.long),
                ("segment_ids", torch.long)]}
        out["tokens"] = torch.full((bsz, seq), self.pad_id, dtype=torch.long)
        cu, images, sizes, frames, num_images = [0], [], [], [], torch.zeros(bsz, dtype=torch.long)
        for r, (batch, row_lens) in enumerate(zip(per_row, lens)):
            pos, seg = 0, 0
            if sum(row_lens) > seq:
                raise ValueError(f"packed row of {sum(row_lens)} tokens exceeds seq_length {seq}")
            for k, n in enumerate(row_lens):
                for key in ("tokens", "labels", "loss_mask"):
                    out[key][r, pos:pos + n] = batch[key][k, :n]
                out["position_ids"][r, pos:pos + n] = torch.arange(n)
                out["segment_ids"][r, pos:pos + n] = seg
                pos, seg = pos + n, seg + 1
                cu.append(r * seq + pos)
            if pos < seq:  # padding: one more segment
                out["position_ids"][r, pos:] = torch.arange(seq - pos)
                out["segment_ids"][r, pos:] = seg
                cu.append((r + 1) * seq)
            if batch is not None:
                num_images[r] = batch["num_images"].sum()
                if batch["images"] is not None:
                    images.append(batch["images"])
                    frames.append(item_frames(batch, batch["images"].shape[0]))
                if batch.get("image_sizes") is not None:
                    sizes.append(batch["image_sizes"])
        out["attention_mask"] = packed_attention_mask(out["segment_ids"])
        out["row_tokens"] = torch.tensor([sum(x) for x in lens], dtype=torch.long)  # before the padding
        out["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
        out["max_seqlen"] = int(torch.diff(out["cu_seqlens"]).max()) if len(cu) > 1 else 0
        out["images"] = torch.cat(images) if images else None
        out["num_images"] = num_images
        if sizes:  # tiled images (model.mm_cfg.image_tiling): their original sizes, in image order
            out["image_sizes"] = torch.cat(sizes)
        if any(f.any() for f in frames):  # video frames among the images (model.mm_cfg.video.pool pools them)
            out["video_frames"] = torch.cat(frames)
        out["num_dropped"] = torch.tensor(dropped, dtype=torch.long)
        out["ids"] = [[it.get("id") for it in row] for row in rows]  # per row, in segment order
        out["skips"] = new_skips(self.skip_source)
        if windows_done:
            out["windows_done"] = windows_done
        return out


# ---------------------------------------------------------------------------------------- THD (TE path)
def cu_seqlens_from_segments(segment_ids: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """[B,S] segment ids (restarting per row) -> int32 offsets of every segment in the flattened [B*S]
    tokens, the padding segment included: the same as PackedCollator's `cu_seqlens`, but computed from a
    tensor that survives the split into micro-batches. With `keep` ([B,S] bool), only the kept tokens are
    flattened (`to_thd(drop_padding=True)`)."""
    bsz, seq = segment_ids.shape
    rows = torch.arange(bsz, device=segment_ids.device)[:, None].expand(bsz, seq)
    flat, rows = (segment_ids.reshape(-1), rows.reshape(-1)) if keep is None else (segment_ids[keep], rows[keep])
    starts = torch.ones_like(flat, dtype=torch.bool)
    # every row starts a segment, even if its id equals the previous row's last
    starts[1:] = (flat[1:] != flat[:-1]) | (rows[1:] != rows[:-1])
    idx = starts.nonzero().flatten().cpu()
    return torch.cat([idx, torch.tensor([flat.numel()])]).to(torch.int32)


def packed_seq_params(segment_ids: torch.Tensor, keep: torch.Tensor | None = None):
    """megatron-core PackedSeqParams (qkv_format='thd') for a packed micro-batch: the attention kernel
    (TE fused/flash attention, or SDPACoreAttention on CPU) then attends within each sample only."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens_from_segments(segment_ids, keep).to(segment_ids.device)
    max_len = int(torch.diff(cu).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)


def to_thd(mb: dict, drop_padding: bool = False) -> dict:
    """A packed micro-batch [B,S] -> one row [1, B*S] plus `packed_seq_params`, the layout megatron-core
    needs for qkv_format='thd' (its attention squeezes the batch dimension). Rows are concatenated in
    order, so image placeholders keep their order and the images need no change.

    `drop_padding`: leave each row's padding tail (past `row_tokens`, PackedCollator) out, so the row is
    [1, real tokens]: padding is a segment of its own with no loss, so the samples' losses and gradients
    do not change, and no layer computes it. Needs a layout where the length may vary per micro-batch
    (one pipeline stage, no sequence parallelism: see MegatronNevaModel._packed_layout)."""
    out = dict(mb)
    keep = None
    if drop_padding:
        if mb.get("row_tokens") is None:
            raise ValueError("to_thd(drop_padding=True) needs the batch's 'row_tokens' (PackedCollator)")
        keep = torch.arange(mb["tokens"].shape[1], device=mb["tokens"].device)[None] < mb["row_tokens"][:, None]
        if not keep.any():  # a micro-batch of padding only: keep one layout rule, its padding
            keep = None
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        out[key] = (mb[key] if keep is None else mb[key][keep]).reshape(1, -1)
    if mb.get("num_images") is not None:
        out["num_images"] = mb["num_images"].sum().reshape(1)
    out["segment_ids"] = mb["segment_ids"]  # kept [B,S] for per-sample bookkeeping
    out["attention_mask"] = None
    out["packed_seq_params"] = packed_seq_params(mb["segment_ids"], keep)
    return out
