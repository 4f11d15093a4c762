"""The entries of the HF <-> GPTModel weight tables (nemo_neva/pretrained/hf_lm.py): which HF tensors make one
GPTModel parameter (`Plain`, `Vocab`, `Gated`, `QKV`), read shard by shard for a tensor-parallel rank and
written back for export; plus the per-query-group QKV packing the TensorRT-LLM export shares."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from nemo_neva.pretrained.weights import WeightSource

@dataclass(frozen=True)
class Src:
    """One HF tensor, seen as [out, in] (`transpose`: stored [in, out]); `rows`: logical rows
    [offset, offset + rows) of a fused tensor."""
    name: str
    transpose: bool = False
    offset: int = 0
    rows: Optional[int] = None

    def shape(self, source: WeightSource) -> tuple:
        shape = tuple(source.shape(self.name))
        if self.transpose:
            shape = shape[::-1]
        return (self.rows, *shape[1:]) if self.rows is not None else shape

    def read(self, source: WeightSource, ranges: Optional[dict] = None) -> torch.Tensor:
        """The logical tensor, limited to `ranges` {logical dim: (start, stop)}; only those bytes are read."""
        nd = len(source.shape(self.name))
        index = [slice(None)] * nd
        if self.rows is not None:
            index[0] = slice(self.offset, self.offset + self.rows)
        for dim, (a, b) in (ranges or {}).items():
            base = self.offset if dim == 0 else 0
            index[dim] = slice(base + a, base + b)
        if self.transpose:
            index = index[::-1]
        t = source.read(self.name, tuple(index))
        return t.t() if self.transpose else t


def _chunk(length: int, part) -> tuple[int, int]:
    _, rank, size = part
    n = length // size
    return rank * n, (rank + 1) * n


def _shape_error(srcs, got, want) -> str:
    return f"{' + '.join(s.name for s in srcs)}: checkpoint shape {tuple(got)} does not fit the model's {tuple(want)}"


class Spec:
    def sources(self) -> list[Src]:
        raise NotImplementedError

    def check(self, source: WeightSource, shape: tuple) -> Optional[str]:
        """None, or why the checkpoint tensors cannot make a parameter of global `shape`."""
        raise NotImplementedError

    def local(self, source: WeightSource, shape: tuple, part) -> torch.Tensor:
        """This rank's piece; `part` = (partition dim, tp rank, tp size) or None for the whole tensor."""
        raise NotImplementedError

    def split(self, full: torch.Tensor) -> list[tuple[Src, torch.Tensor]]:
        """A TP=1 parameter back into its HF tensors (export)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Plain(Spec):
    src: Src

    def sources(self):
        return [self.src]

    def check(self, source, shape):
        got = self.src.shape(source)
        return None if got == tuple(shape) else _shape_error([self.src], got, shape)

    def local(self, source, shape, part):
        if part is None:
            return self.src.read(source)
        return self.src.read(source, {part[0]: _chunk(shape[part[0]], part)})

    def split(self, full):
        return [(self.src, full)]


@dataclass(frozen=True)
class Vocab(Spec):
    """Embedding / output rows: the checkpoint's rows, then zero rows up to the padded vocabulary."""
    src: Src

    def sources(self):
        return [self.src]

    def check(self, source, shape):
        got = self.src.shape(source)
        if got[1:] != tuple(shape[1:]) or got[0] > shape[0]:
            return _shape_error([self.src], got, shape)
        return None

    def local(self, source, shape, part):
        a, b = (0, shape[0]) if part is None else _chunk(shape[0], part)
        rows = self.src.shape(source)[0]
        have = self.src.read(source, {0: (min(a, rows), min(b, rows))})
        out = have.new_zeros((b - a, *have.shape[1:]))
        out[: have.shape[0]] = have
        return out

    def split(self, full):
        return [(self.src, full)]  # the caller cuts the padding off (it knows the exported vocabulary)


@dataclass(frozen=True)
class Gated(Spec):
    """SwiGLU fc1 = [gate; up]; megatron-core shards gate and up separately ([gate_r; up_r] on rank r)."""
    gate: Src
    up: Src

    def sources(self):
        return [self.gate, self.up]

    def check(self, source, shape):
        want = (shape[0] // 2, *shape[1:])
        for s in (self.gate, self.up):
            if s.shape(source) != want:
                return _shape_error([s], s.shape(source), want)
        return None

    def local(self, source, shape, part):
        if part is None:
            return torch.cat([self.gate.read(source), self.up.read(source)], dim=0)
        ranges = {0: _chunk(shape[0] // 2, part)}
        return torch.cat([self.gate.read(source, ranges), self.up.read(source, ranges)], dim=0)

    def split(self, full):
        gate, up = torch.chunk(full, 2, dim=0)
        return [(self.gate, gate), (self.up, up)]


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """HF q/k/v (weights [rows, in] or biases [rows]) -> megatron `linear_qkv` ([q of group g, k_g, v_g] per g)."""
    vector = q.dim() == 1
    if vector:
        q, k, v = q.unsqueeze(-1), k.unsqueeze(-1), v.unsqueeze(-1)
    d = q.shape[0] // heads
    h_in = q.shape[1]
    packed = torch.cat([q.reshape(groups, heads // groups * d, h_in), k.reshape(groups, d, h_in),
                        v.reshape(groups, d, h_in)], dim=1).reshape(-1, h_in)
    return packed.squeeze(-1) if vector else packed


def unpack_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    vector = qkv.dim() == 1
    if vector:
        qkv = qkv.unsqueeze(-1)
    per_group = heads // groups * head_dim
    grouped = qkv.reshape(groups, per_group + 2 * head_dim, qkv.shape[-1])
    parts = torch.split(grouped, [per_group, head_dim, head_dim], dim=1)
    parts = tuple(t.reshape(-1, qkv.shape[-1]).contiguous() for t in parts)
    return tuple(t.squeeze(-1) for t in parts) if vector else parts


@dataclass(frozen=True)
class QKV(Spec):
    q: Src
    k: Src
    v: Src
    heads: int
    groups: int

    def sources(self):
        return [self.q, self.k, self.v]

    def _head_dim(self, shape) -> int:
        return shape[0] // (self.heads + 2 * self.groups)

    def check(self, source, shape):
        d = self._head_dim(shape)
        rest = tuple(shape[1:])
        want = {self.q: (self.heads * d, *rest), self.k: (self.groups * d, *rest), self.v: (self.groups * d, *rest)}
        for s, w in want.items():
            if s.shape(source) != w:
                return f"{s.name}: checkpoint shape {s.shape(source)} != {w} ({self.heads} heads, " \
                       f"{self.groups} query groups, head dim {d} from the config)"
        return None

    def local(self, source, shape, part):
        d = self._head_dim(shape)
        g0, g1 = (0, self.groups) if part is None else _chunk(self.groups, part)
        qpg = self.heads // self.groups
        q = self.q.read(source, {0: (g0 * qpg * d, g1 * qpg * d)})
        k = self.k.read(source, {0: (g0 * d, g1 * d)})
        v = self.v.read(source, {0: (g0 * d, g1 * d)})
        return pack_qkv(q, k, v, (g1 - g0) * qpg, g1 - g0)

    def split(self, full):
        q, k, v = unpack_qkv(full, self.heads, self.groups, self._head_dim(full.shape))
        return [(self.q, q), (self.k, k), (self.v, v)]


# ------------------------------------------------------------------------------------------------- tables
