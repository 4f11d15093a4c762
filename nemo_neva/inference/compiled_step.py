"""Opt-in `torch.compile` of the decode step (`inference.compile`, `generate(..., compile_decode=True)`).

Why: on CPU a cached decode step of a small model is mostly per-module Python work of megatron-core, not
arithmetic (bench/BENCHMARKS.md "Generation"); inductor fuses it away. Only the language model is compiled,
and only for one-token steps: those never carry image placeholders (the sampler excludes the image token),
so calling it directly equals `NevaModule.forward` there. `dynamic=True` keeps one compiled graph for every
cache offset and batch size instead of one per decoded token. Compiled once per model and process (the
first step pays it: seconds to tens of seconds on CPU); the prefill stays eager.
"""
from __future__ import annotations

import weakref

import torch

# Not an attribute of the module: an nn.Module attribute would be registered as a submodule (state dict).
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_language_model(neva_module):
    lm = neva_module.language_model
    if lm not in _COMPILED:
        _COMPILED[lm] = torch.compile(lm, dynamic=True)
    return _COMPILED[lm]
