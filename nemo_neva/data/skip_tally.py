"""Skipped-sample counts as the training loop sees them: what the dataset rejected before training plus
what DataLoader workers (or the main process) skipped while loading, summed over data-parallel ranks.

Workers count skips in their own copy of the dataset; each batch brings its share in `batch["skips"]`
(see collate.py), and `add` collects those in the main process. Skips found before training
(`prescan_skips`) are the same on every rank (each rank scans the whole annotation file), so they are
counted once, not summed.
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping

import torch


class SkipTally:
    def __init__(self, prescan: Mapping[str, int] | None = None):
        self.prescan = Counter(prescan or {})
        self.streamed: Counter = Counter()  # this rank's loading-time skips

    def add(self, batch) -> None:
        skips = batch.get("skips") if isinstance(batch, Mapping) else None
        if skips:
            self.streamed.update({k: int(v) for k, v in skips.items()})

    def global_counts(self, group=None) -> Counter:
        """prescan + loading-time skips of every rank in `group` (collective over it when it has > 1 rank)."""
        total = Counter(self.prescan)
        if group is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
            gathered = [None] * torch.distributed.get_world_size(group)
            torch.distributed.all_gather_object(gathered, dict(self.streamed), group=group)
            for part in gathered:
                total.update(part)
        else:
            total.update(self.streamed)
        return total
