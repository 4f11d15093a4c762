"""Weighted blends of tar-shard sources (`data_path: [w1, SHARDS_A, w2, SHARDS_B]`), streamed.

The blend is itself a ShardedNevaDataset whose epoch sequence interleaves its sources: position i of an
epoch (as many positions as the sources hold together) takes the next draw of the source that
megatron-core's `build_blending_indices` names (see blend.py), and a source's draws walk through its own
seeded shard/shuffle-buffer order, a fresh order for every pass over it. Everything downstream -- the
split over data-parallel ranks and DataLoader workers, the position (`consumed`) and resume, packing
windows -- is ShardedNevaDataset's, unchanged, because it only reads `epoch_order()`, `shards` and `total`.
"""
from __future__ import annotations

from typing import Sequence

import numpy

from nemo_neva.data.blend import blending_indices
from nemo_neva.data.shards import ShardedNevaDataset


class BlendedShardedDataset(ShardedNevaDataset):
    def __init__(self, sources: Sequence[ShardedNevaDataset], weights: Sequence[float], size: int | None = None,
                 names: Sequence[str] | None = None):
        if len(sources) != len(weights):
            raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
        names = list(names) if names is not None else [f"source {i}" for i in range(len(sources))]
        keep = [i for i, w in enumerate(weights) if w > 0]
        self.sources, self.names = [sources[i] for i in keep], [names[i] for i in keep]
        total_w = sum(weights[i] for i in keep)
        self.weights = [weights[i] / total_w for i in keep]
        first = self.sources[0]  # every source was built from the same data config
        self.encoder = first.encoder
        self.dp_rank, self.dp_size, self.seed = first.dp_rank, first.dp_size, first.seed
        self.shuffle, self.shuffle_buffer = first.shuffle, first.shuffle_buffer
        self.drop_remainder, self.batch_size = first.drop_remainder, first.batch_size
        self.epoch, self._start, self._local = 0, 0, 0
        self.shards, self._shard_offset = [], []
        for src in self.sources:
            self._shard_offset.append(len(self.shards))
            self.shards += src.shards
        self.total = int(size) if size is not None else sum(src.total for src in self.sources)
        if self.total < 1:
            raise ValueError("a blend needs size >= 1")
        self.source_of, self.draw = blending_indices(self.weights, self.total)
        drawn = numpy.bincount(self.source_of, minlength=len(self.sources))
        for name, n, w in zip(self.names, drawn, self.weights):
            if n == 0:
                raise ValueError(f"blend source {name!r} (weight {w:.3g}) gets no sample in {self.total} draws; "
                                 f"raise its weight")

    @property
    def shuffle(self) -> bool:
        return self._shuffle

    @shuffle.setter
    def shuffle(self, value: bool) -> None:  # the loader turns shuffling off for evaluation: sources too
        self._shuffle = bool(value)
        for src in self.sources:
            src.shuffle = bool(value)

    def _source_sequence(self, s: int, pass_: int) -> list[tuple[int, int]]:
        """(global shard number, file index) of source s's samples in its order for this pass."""
        off = self._shard_offset[s]
        order = self.sources[s].epoch_order(epoch=f"{self.epoch}.{pass_}")
        return [(off + shard, fi) for shard, perm in order for fi in perm]

    def epoch_order(self, epoch=None) -> list[tuple[int, list[int]]]:
        if epoch is not None and epoch != self.epoch:
            raise ValueError("a blend orders its current epoch only")
        cache: dict[tuple[int, int], list] = {}
        runs: list[tuple[int, list[int]]] = []
        for s, d in zip(self.source_of.tolist(), self.draw.tolist()):
            n = self.sources[s].total
            key = (s, d // n)
            if key not in cache:
                cache[key] = self._source_sequence(*key)
            shard, fi = cache[key][d % n]
            if runs and runs[-1][0] == shard:
                runs[-1][1].append(fi)
            else:
                runs.append((shard, [fi]))
        return runs

    def counts(self) -> dict[str, int]:
        return dict(zip(self.names, numpy.bincount(self.source_of, minlength=len(self.sources)).tolist()))

    def summary(self) -> str:
        parts = ", ".join(f"{n} (weight {w:.3f}, {c} draws/epoch)" for n, w, c in
                          zip(self.names, self.weights, self.counts().values()))
        return f"blend of {len(self.sources)} shard sources: {parts}; " + super().summary()
