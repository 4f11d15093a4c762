"""Reading checkpoint tensors lazily: memory-mapped safetensors (single file or sharded with an index), read
slice by slice, so a tensor-parallel rank touches only the rows/columns of its own shard.

A pickle checkpoint (`*.bin`) can run code when loaded: it is refused unless the caller trusts it explicitly,
and then loaded with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Callable, Optional

import torch


class UnsupportedCheckpoint(ValueError):
    """The checkpoint (or model) uses something nemo_neva cannot express on the other side."""


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class WeightSource:
    """name -> tensor of a checkpoint folder, without loading it: `shape(name)`, `read(name, index)`.

    `rename` maps a stored key to the canonical one the mapping tables use (e.g. the LLaVA aliases); two
    stored keys with one canonical name are an error.
    """

    def __init__(self, files: dict[str, str], rename: Optional[Callable[[str], str]] = None,
                 tensors: Optional[dict[str, torch.Tensor]] = None):
        self._handles: dict[str, object] = {}
        self._where: dict[str, tuple[str, str]] = {}  # canonical -> (file, stored key)
        self._tensors = {}
        rename = rename or (lambda k: k)
        for stored, path in files.items():
            self._add(rename(stored), (path, stored))
        for stored, t in (tensors or {}).items():
            self._add(rename(stored), None)
            self._tensors[rename(stored)] = t

    def _add(self, name: str, where) -> None:
        if name in self._where or name in self._tensors:
            raise ValueError(f"checkpoint has two tensors for {name!r}")
        if where is not None:
            self._where[name] = where

    def names(self) -> set:
        return set(self._where) | set(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._where or name in self._tensors

    def _handle(self, name: str):
        path, stored = self._where[name]
        handle = self._handles.get(path)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[path] = safe_open(path, framework="pt", device="cpu")
        return handle, stored

    def _slice(self, name: str):
        handle, stored = self._handle(name)
        return handle.get_slice(stored)

    def shape(self, name: str) -> tuple:
        if name in self._tensors:
            return tuple(self._tensors[name].shape)
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        if name in self._tensors:
            return self._tensors[name].dtype
        return _SAFETENSORS_DTYPES.get(self._slice(name).get_dtype(), torch.float32)

    def read(self, name: str, index: Optional[tuple] = None) -> torch.Tensor:
        """The stored tensor, or `tensor[index]` (a tuple of slices) read from disk without the rest."""
        if name in self._tensors:
            t = self._tensors[name]
            return t if index is None else t[index]
        if index is None:
            handle, stored = self._handle(name)
            return handle.get_tensor(stored)
        return self._slice(name)[index]


def open_weights(folder: str, trust_pickle: bool = False, rename: Optional[Callable[[str], str]] = None,
                 what: str = "checkpoint") -> WeightSource:
    """The weights of a HF folder: `model.safetensors.index.json` (every shard it names must exist),
    else every `*.safetensors`; pickle `*.bin` only with `trust_pickle`."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map") or {}
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise FileNotFoundError(f"{folder}: model.safetensors.index.json names {len(missing)} shard(s) that are "
                                    f"not there: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        return WeightSource({k: os.path.join(folder, v) for k, v in weight_map.items()}, rename)
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if files:
        from safetensors import safe_open

        keys = {}
        for path in files:
            with safe_open(path, framework="pt", device="cpu") as f:
                keys.update({k: path for k in f.keys()})
        return WeightSource(keys, rename)
    pickles = sorted(glob.glob(os.path.join(folder, "*.bin")))
    if not pickles:
        raise FileNotFoundError(f"{folder}: no *.safetensors (or *.bin) weight files in this {what} folder")
    if not trust_pickle:
        raise UnsupportedCheckpoint(
            f"{folder} holds only pickle weights ({', '.join(os.path.basename(p) for p in pickles)}); "
            "loading a pickle can run arbitrary code. Convert it to safetensors, or pass --trust-pickle "
            "(model.mm_cfg.llm.trust_pickle=true) if you trust its origin"
        )
    raw = {}
    for path in pickles:
        raw.update(torch.load(path, map_location="cpu", weights_only=True))
    return WeightSource({}, rename, tensors=raw)


def read_all(source: WeightSource) -> dict[str, torch.Tensor]:
    return {name: source.read(name) for name in sorted(source.names())}
