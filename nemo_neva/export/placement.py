"""Inputs an export step feeds a model, put where the model is: the device of its parameters and, for floating
tensors, their dtype. NeMo's `restore_from` puts a model on CUDA when there is one; inputs built on the host
would then fail in the first layer, and fp32 inputs to a bf16 module in its first matmul."""
from __future__ import annotations

import torch


def placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of `module`'s first parameter: where its inputs belong."""
    param = next(module.parameters())
    return param.device, param.dtype


def on_module(value, module: torch.nn.Module):
    """`value` (a tensor, or a dict / list of them; other values pass through) on `module`'s device, floating
    tensors in its dtype."""
    device, dtype = placement(module)
    if torch.is_tensor(value):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, dict):
        return {k: on_module(v, module) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_module(v, module) for v in value)
    return value
