"""Energon's savable loader state <-> plain data (dicts, lists, str, bytes, numbers, tensors), so a training
checkpoint holding it loads with `torch.load(weights_only=True)`; only Energon's own state dataclasses are
rebuilt from it (a checkpoint is untrusted input: no pickle)."""
from __future__ import annotations

import dataclasses
import importlib

import torch


# ---------------------------------------------------------------------------------------- state as plain data
def to_plain(obj):
    """Energon's loader state -> dicts, lists, str, bytes, numbers and tensors only (weights_only-loadable)."""
    import numpy as np

    from megatron.energon.state import FlexState

    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor)):
        return obj
    if isinstance(obj, FlexState):
        return {"__flex__": {str(k): to_plain(v) for k, v in obj.items()}}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        return {"__energon__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: to_plain(v) for k, v in obj.items()}
        return {"__dict__": [[to_plain(k), to_plain(v)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_plain(v) for v in obj]}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj)).clone()}
    if isinstance(obj, np.generic):
        return {"__npscalar__": obj.item(), "dtype": str(obj.dtype)}
    raise TypeError(f"cannot store a {type(obj).__module__}.{type(obj).__qualname__} in a data position")


def from_plain(obj):
    """Inverse of to_plain; rebuilds only dataclasses defined in megatron.energon."""
    import numpy as np

    from megatron.energon.state import FlexState

    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__flex__" in obj:
        return FlexState({k: from_plain(v) for k, v in obj["__flex__"].items()})
    if "__tuple__" in obj:
        return tuple(from_plain(v) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {from_plain(k): from_plain(v) for k, v in obj["__dict__"]}
    if "__ndarray__" in obj:
        return obj["__ndarray__"].numpy().copy()
    if "__npscalar__" in obj:
        return np.dtype(obj["dtype"]).type(obj["__npscalar__"])
    if "__energon__" in obj:
        module, _, qualname = str(obj["__energon__"]).partition(":")
        if module != "megatron.energon" and not module.startswith("megatron.energon."):
            raise ValueError(f"data position names {obj['__energon__']!r}, not an Energon state class")
        cls = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ValueError(f"data position names {obj['__energon__']!r}, which is not an Energon state class")
        fields = {k: from_plain(v) for k, v in obj["fields"].items()}
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        inst = cls(**{k: v for k, v in fields.items() if k in init})
        for k, v in fields.items():
            if k not in init:
                object.__setattr__(inst, k, v)
        return inst
    return {k: from_plain(v) for k, v in obj.items()}


