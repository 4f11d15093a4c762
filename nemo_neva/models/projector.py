"""Vision-to-language projectors: `linear` and `mlpNx_gelu` (LLaVA-1.5 uses mlp2x_gelu)."""
from __future__ import annotations

import re

from torch import nn


def build_projector(kind: str, vision_hidden: int, llm_hidden: int) -> nn.Module:
    """Projector by name. Replicated on every TP rank (it is small and its grads agree across ranks)."""
    if kind == "linear":
        return nn.Linear(vision_hidden, llm_hidden)
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match:
        depth = int(match.group(1))
        if depth < 1:
            raise ValueError(f"mm_mlp_adapter_type {kind!r}: depth must be >= 1")
        layers = [nn.Linear(vision_hidden, llm_hidden)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(llm_hidden, llm_hidden)]
        return nn.Sequential(*layers)
    raise ValueError(
        f"unknown model.mm_cfg.mm_mlp_adapter_type {kind!r}; supported: linear, mlpNx_gelu (e.g. mlp2x_gelu)"
    )
