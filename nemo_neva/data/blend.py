"""Weighted blends of datasets: `data_path: [w1, path1, w2, path2, ...]`, as in NeMo/Megatron.

Which source each position of the blend draws from comes from megatron-core's
`helpers.build_blending_indices` (greedy: position i goes to the source furthest behind its share), so
any prefix of the blend follows the normalised weights as closely as integers allow. megatron-core's
`BlendedDataset` itself does not fit: it only blends `MegatronDataset`s (index splits, a
`BlendedMegatronDatasetConfig`, a disk cache) and refuses to draw more samples from a source than it
holds, whereas a small source with a large weight here is simply repeated. Which *sample* of a source a
draw gets is a seeded permutation of that source, redrawn for every pass over it, so an undersampled
source is not always cut to its first samples and an oversampled one repeats in varying order.
"""
from __future__ import annotations

import math
import os
import random
from collections import Counter
from numbers import Real
from typing import Sequence

import numpy


def parse_blend(data_path) -> tuple[list, list[float] | None]:
    """(paths, normalised weights or None). `[w1, p1, w2, p2, ...]` is a weighted blend; a list of paths
    (or one path) is a plain concatenation (weights None). Raises ValueError on anything else."""
    if isinstance(data_path, (str, bytes, os.PathLike)) or not hasattr(data_path, "__iter__"):
        return [data_path], None
    items = list(data_path)
    if not items:
        raise ValueError("model.data.data_path is an empty list")

    def is_weight(x):
        return isinstance(x, Real) and not isinstance(x, bool)

    if not any(is_weight(x) for x in items):
        return items, None
    if len(items) % 2:
        raise ValueError(f"a weighted data_path is [w1, path1, w2, path2, ...]; got an odd-length list of "
                         f"{len(items)} items: {items!r}")
    weights, paths = items[0::2], items[1::2]
    for w, p in zip(weights, paths):
        if not is_weight(w) or not isinstance(p, str):
            raise ValueError(f"a weighted data_path is [w1, path1, w2, path2, ...] (numbers then paths); "
                             f"got the pair ({w!r}, {p!r})")
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"blend weight {w!r} for {p!r} must be a finite number >= 0")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"the blend weights {weights} sum to {total}; at least one must be > 0")
    return paths, [float(w) / total for w in weights]


def blending_indices(weights: Sequence[float], size: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    """(source of each position, running draw number within that source), megatron-core's helper."""
    from megatron.core.datasets import helpers

    source = numpy.zeros(size, dtype=numpy.int16)
    draw = numpy.zeros(size, dtype=numpy.int64)
    helpers.build_blending_indices(source, draw, numpy.asarray(weights, dtype=numpy.float64),
                                   len(weights), size, False)
    return source, draw


class BlendedNevaDataset:
    """Map-style blend of map-style datasets (NevaDataset items); `size` positions per epoch (default:
    the sources' total). Sources with weight 0 are left out; a source that would get no draw at all is an
    error (raise `size` or its weight), so every configured source is reachable."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], seed: int = 1234, size: int | None = None,
                 names: Sequence[str] | None = None):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        names = list(names) if names is not None else [f"source {i}" for i in range(len(datasets))]
        keep = [i for i, w in enumerate(weights) if w > 0]
        self.datasets = [datasets[i] for i in keep]
        self.names = [names[i] for i in keep]
        total = sum(weights[i] for i in keep)
        self.weights = [weights[i] / total for i in keep]
        self.size = int(size) if size is not None else sum(len(d) for d in self.datasets)
        if self.size < 1:
            raise ValueError("a blend needs size >= 1")
        self.seed = seed
        self.source, self.draw = blending_indices(self.weights, self.size)
        drawn = numpy.bincount(self.source, minlength=len(self.datasets))
        for name, n, w in zip(self.names, drawn, self.weights):
            if n == 0:
                raise ValueError(f"blend source {name!r} (weight {w:.3g}) gets no sample in {self.size} draws; "
                                 f"raise its weight")
        self._perms: dict[tuple[int, int], list[int]] = {}
        self.lengths = [self.datasets[s].lengths[self._sample(s, int(d))] if hasattr(self.datasets[s], "lengths")
                        else 0 for s, d in zip(self.source.tolist(), self.draw.tolist())]

    def _sample(self, source: int, draw: int) -> int:
        """The index in `source` of its `draw`-th draw: pass draw // n over a seeded permutation."""
        n = len(self.datasets[source])
        key = (source, draw // n)
        perm = self._perms.get(key)
        if perm is None:
            perm = list(range(n))
            random.Random(f"{self.seed}:blend:{source}:{key[1]}").shuffle(perm)
            self._perms[key] = perm
        return perm[draw % n]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        s = int(self.source[idx])
        return self.datasets[s][self._sample(s, int(self.draw[idx]))]

    def counts(self) -> dict[str, int]:
        """Draws per source in one epoch of the blend."""
        return dict(zip(self.names, numpy.bincount(self.source, minlength=len(self.datasets)).tolist()))

    @property
    def skip_counts(self) -> Counter:
        out: Counter = Counter()
        for d in self.datasets:
            out.update(getattr(d, "skip_counts", {}))
        return out

    @property
    def prescan_skips(self) -> Counter:
        out: Counter = Counter()
        for d in self.datasets:
            out.update(getattr(d, "prescan_skips", {}))
        return out

    def take_new_skips(self) -> Counter:
        out: Counter = Counter()
        for d in self.datasets:
            out.update(d.take_new_skips())
        return out

    def summary(self) -> str:
        parts = [f"{name} (weight {w:.3f}, {n} draws/epoch): {d.summary()}"
                 for name, w, n, d in zip(self.names, self.weights, self.counts().values(), self.datasets)]
        return f"blend of {len(self.datasets)} sources, {self.size} samples/epoch; " + "; ".join(parts)
