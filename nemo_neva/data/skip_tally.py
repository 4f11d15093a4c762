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


# Share of skipped samples above which the report is a warning: a few lost samples are normal in web data,
# more usually means a setting (context length, image limits) is wrong for the data.
LOUD_FRACTION = 0.02
_LENGTH_FIX = "raise model.encoder_seq_length (and model.data.seq_length) or use a tower with fewer image tokens"
FIXES = {
    "image_does_not_fit": _LENGTH_FIX,
    "no_trainable_tokens": _LENGTH_FIX + " (the answer was cut off)",
    "too_long": "raise model.encoder_seq_length when training, or lower max_new_tokens",
    "image_too_large": "raise model.data.max_image_bytes if the images are trusted",
    "image_too_many_pixels": "raise model.data.max_image_pixels if the images are trusted",
    "tokenization_mismatch": "the tokenizer does not round-trip the rendered conversation; check the template",
}


def skip_report(counts: Mapping[str, int], total: int | None, what: str = "samples") -> tuple[str, bool]:
    """(one line with the skip totals by reason and their share of `total`, loud) where loud means the share
    is above LOUD_FRACTION; a loud line names the fix for each reason that has a known one."""
    skipped = sum(counts.values())
    by_reason = ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"
    if not total:
        return f"skipped {skipped} {what} ({by_reason})", False
    share = skipped / total
    line = f"skipped {skipped} of {total} {what} ({100 * share:.1f} %): {by_reason}"
    loud = share > LOUD_FRACTION
    if loud:
        fixes = [f"{k}: {FIXES[k]}" for k in sorted(counts) if counts[k] and k in FIXES]
        line += f" -- more than {100 * LOUD_FRACTION:.0f} % of the data is lost" + (
            "; to keep it: " + "; ".join(fixes) if fixes else "")
    return line, loud
