"""Evaluation order over data-parallel ranks: every sample exactly once, every rank the same number of steps.

torch's DistributedSampler(drop_last=False) evens the ranks out by serving the first samples a second time,
which counts them twice in a validation loss. `EvalSampler` gives rank r the samples r, r+dp, r+2dp, ... and
fills a rank that runs out with a blank index; `EvalBlanks` turns that index into an empty item (the
collators make it an all-padding row with loss_mask 0). So the ranks run the same number of validation steps
(their collectives pair up) and each sample adds its tokens to the loss once. A last batch smaller than the
others is filled up to whole micro-batches by the model (`training.megatron_step.pad_to_microbatches`).
"""
from __future__ import annotations

from torch.utils.data import Dataset, Sampler


class EvalSampler(Sampler):
    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.total, self.num_replicas, self.rank = int(num_samples), int(num_replicas), int(rank)
        self.per_rank = -(-self.total // self.num_replicas)

    def __iter__(self):
        mine = list(range(self.rank, self.total, self.num_replicas))
        return iter(mine + [self.total] * (self.per_rank - len(mine)))  # self.total: EvalBlanks' blank

    def __len__(self) -> int:
        return self.per_rank


class EvalBlanks(Dataset):
    """`dataset` plus one blank item at index len(dataset): `blank` (None for sample datasets, [] for packed
    rows: what their collators turn into an empty row)."""

    def __init__(self, dataset, blank=None):
        self.dataset, self.blank = dataset, blank

    def __len__(self) -> int:
        return len(self.dataset) + 1

    def __getitem__(self, idx: int):
        return self.blank if idx == len(self.dataset) else self.dataset[idx]

    def take_new_skips(self):
        return self.dataset.take_new_skips()

    def summary(self) -> str:
        return self.dataset.summary()
