"""Batching: shift to next-token targets, right-pad, gather images in sample (and tag) order."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from nemo_neva.data.constants import IGNORE_INDEX


class NevaCollator:
    """items (dicts from NevaDataset, or None for a dropped sample) -> model batch.

    tokens = input_ids[:-1], labels = input_ids' labels[1:] (IGNORE -> 0, since megatron's
    cross-entropy has no ignore index; loss_mask carries the information). A dropped item becomes an
    all-padding row with loss_mask 0, so the batch size stays fixed (pipeline schedules rely on it);
    `num_dropped` says how many. `pad_to` fixes S (e.g. seq_length for pipeline parallelism).
    `images` [N_total, 3, H, W]: every row's images (item["images"] [n, 3, H, W]) concatenated in row order,
    `num_images[row]` = that row's n (0 for a text-only or dropped row); the model splits them by it.
    `video_frames` [N_total] bool (only when some item has video frames): which images are frames.

    `skip_source` (the dataset's `take_new_skips`): called once per batch, in the process that fetched
    the items (a DataLoader worker or the main process), so `batch["skips"]` ({reason: count}) brings the
    skips counted in a worker's copy of the dataset to the main process.
    """

    def __init__(self, pad_id: int, pad_to: int | None = None,
                 skip_source: Callable[[], Mapping[str, int]] | None = None):
        self.pad_id = int(pad_id)
        self.pad_to = pad_to
        self.skip_source = skip_source

    def __call__(self, items: Sequence[dict | None]) -> dict:
        kept = [it for it in items if it is not None]
        lengths = [len(it["input_ids"]) - 1 for it in kept]
        seq = max(lengths + [1])
        if self.pad_to is not None:
            if seq > self.pad_to:
                raise ValueError(f"sample of {seq} tokens does not fit pad_to={self.pad_to}")
            seq = self.pad_to
        bsz = len(items)
        tokens = torch.full((bsz, seq), self.pad_id, dtype=torch.long)
        labels = torch.zeros((bsz, seq), dtype=torch.long)
        loss_mask = torch.zeros((bsz, seq), dtype=torch.float)
        num_images = torch.zeros(bsz, dtype=torch.long)
        images, sizes, frames, ids = [], [], [], []
        for row, it in enumerate(items):
            if it is None:
                ids.append(None)
                continue
            n = len(it["input_ids"]) - 1
            target = it["labels"][1:]
            valid = target != IGNORE_INDEX
            tokens[row, :n] = it["input_ids"][:-1]
            labels[row, :n] = torch.where(valid, target, torch.zeros_like(target))
            loss_mask[row, :n] = valid.float()
            pixels = it.get("images")
            if pixels is not None and len(pixels):
                if pixels.ndim not in (4, 5):  # tiled images: [n, max_tiles, 3, tile, tile]
                    raise ValueError(f"item {it.get('id')!r}: 'images' must be [n, 3, H, W] (tiled: "
                                     f"[n, tiles, 3, H, W]), got {tuple(pixels.shape)}")
                images.append(pixels)
                num_images[row] = pixels.shape[0]
                frames.append(item_frames(it, pixels.shape[0]))
                if it.get("image_sizes") is not None:  # tiled images: their original (height, width)
                    sizes.append(torch.as_tensor(it["image_sizes"], dtype=torch.long).reshape(-1, 2))
            ids.append(it.get("id"))
        out = {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": torch.arange(seq, dtype=torch.long).unsqueeze(0).expand(bsz, seq).contiguous(),
            "images": torch.cat(images).float() if images else None,
            "num_images": num_images,
            "num_dropped": torch.tensor(bsz - len(kept), dtype=torch.long),
            "ids": ids,
            "skips": new_skips(self.skip_source),
        }
        if sizes:  # `image_sizes` [n_images, 2]: only for tiled images (model.mm_cfg.image_tiling)
            out["image_sizes"] = torch.cat(sizes)
        if any(f.any() for f in frames):
            out["video_frames"] = torch.cat(frames)
        return out


def item_frames(item: dict, n: int) -> torch.Tensor:
    """An item's (or a collated row's) `video_frames` [n] bool (all False when it has none), its length checked."""
    flags = item.get("video_frames")
    if flags is None:
        return torch.zeros(n, dtype=torch.bool)
    flags = torch.as_tensor(flags, dtype=torch.bool).reshape(-1)
    if flags.numel() != n:
        raise ValueError(f"item {item.get('id')!r}: 'video_frames' has {flags.numel()} entries for {n} images")
    return flags


def new_skips(skip_source) -> dict:
    return {k: int(v) for k, v in skip_source().items() if v} if skip_source is not None else {}
