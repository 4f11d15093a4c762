"""LoRA adapters around megatron-core's tensor-parallel linear layers (y = W x + (alpha / r) * B A x).

megatron-core 0.16.1 ships no LoRA module (its `q_lora_rank`/`kv_lora_rank` are MLA's low-rank projections,
and the TRT-LLM exporter only forwards LoRA options), so this wraps the layers itself:

* column-parallel base (`linear_qkv`, `linear_fc1`; output dim split over TP): A [r, in] is replicated,
  B [out/tp, r] is split on its output dim like W. The rank-r activation goes through
  `copy_to_tensor_model_parallel_region` (backward: all-reduce), so A's gradient and the input gradient
  are the full sums on every rank. Under sequence parallelism the input is first all-gathered like the
  base layer does (backward: keep this rank's slice, the gradient is already complete).
* row-parallel base (`linear_proj`, `linear_fc2`; input dim split over TP): A [r, in/tp] is split on its
  input dim like W, B [out, r] is replicated. The partial A x is all-reduced
  (`reduce_from_tensor_model_parallel_region`), then B runs on every rank; under sequence parallelism the
  result is cut to this rank's sequence slice, like the base layer's reduce-scatter.

B starts at zero, so an untrained adapter leaves the model's output unchanged. The wrapper is transparent
in checkpoints: the base layer's tensors keep their names (`...linear_qkv.weight`), the adapter adds
`...linear_qkv.lora_a` / `lora_b` (sharded like W in dist checkpoints; the SwiGLU-packed `linear_fc1`
output dim uses megatron-core's swiglu factory, as W does).
"""
from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import mappings
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

# target module name -> how megatron-core splits it over tensor-parallel ranks
TARGETS = {"linear_qkv": "column", "linear_proj": "row", "linear_fc1": "column", "linear_fc2": "row"}
ADAPTER_PARAMS = ("lora_a", "lora_b")


class LoraLinear(torch.nn.Module):
    """`base(x)` plus a rank-`rank` update; returns megatron's (output, bias) pair like the base."""

    def __init__(self, base: torch.nn.Module, name: str, config, rank: int, alpha: float, dropout: float,
                 swiglu: bool = False, seed: int = 0):
        super().__init__()
        if name not in TARGETS:
            raise ValueError(f"LoRA target {name!r}; supported: {sorted(TARGETS)}")
        self.base = base
        self.parallel = TARGETS[name]
        self.config = config
        self.scale = alpha / rank
        self.swiglu = swiglu
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else None
        tp = parallel_state.get_tensor_model_parallel_world_size()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        out_local, in_local = base.weight.shape
        dtype = base.weight.dtype
        in_full = in_local * (tp if self.parallel == "row" else 1)
        # A: Kaiming-uniform from a generator seeded by the layer's name, drawn at full size and then sliced,
        # so a TP=1 and a TP=2 model start from the same adapter. B: zeros.
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(in_full)
        a_full = torch.empty(rank, in_full).uniform_(-bound, bound, generator=gen)
        if self.parallel == "row":
            a_full = a_full[:, tp_rank * in_local:(tp_rank + 1) * in_local]
        self.lora_a = torch.nn.Parameter(a_full.to(dtype=dtype, device=base.weight.device).contiguous())
        self.lora_b = torch.nn.Parameter(torch.zeros(out_local, rank, dtype=dtype, device=base.weight.device))
        sharded, dim = (self.lora_b, 0) if self.parallel == "column" else (self.lora_a, 1)
        tensor_parallel.set_tensor_model_parallel_attributes(sharded, is_parallel=True, dim=dim, stride=1)
        self.register_state_dict_post_hook(_strip_base_prefix)
        self.register_load_state_dict_pre_hook(_add_base_prefix)

    # --------------------------------------------------------------------------------------- forward
    def forward(self, x, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)
        return out + self.delta(x).to(out.dtype), bias

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        sp = self.config.sequence_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1
        if self.parallel == "column":
            x = self._fused_norm(x)
            if sp:
                x = mappings.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
            if self.dropout is not None:
                x = self.dropout(x)
            h = mappings.copy_to_tensor_model_parallel_region(F.linear(x, self.lora_a))
            return F.linear(h, self.lora_b) * self.scale
        if self.dropout is not None and self.training:  # input is split over TP ranks: per-rank dropout RNG
            with tensor_parallel.get_cuda_rng_tracker().fork():
                x = self.dropout(x)
        h = mappings.reduce_from_tensor_model_parallel_region(F.linear(x, self.lora_a))
        y = F.linear(h, self.lora_b) * self.scale
        return mappings.scatter_to_sequence_parallel_region(y) if sp else y

    def _fused_norm(self, x: torch.Tensor) -> torch.Tensor:
        """TE's LayerNorm-fused column linear normalises inside; the adapter needs the same normalised input."""
        w = getattr(self.base, "layer_norm_weight", None)
        if w is None:
            return x
        if self.config.layernorm_zero_centered_gamma:
            w = w + 1
        eps = self.config.layernorm_epsilon
        if self.config.normalization == "RMSNorm":
            return F.rms_norm(x, (x.shape[-1],), w, eps)
        return F.layer_norm(x, (x.shape[-1],), w, getattr(self.base, "layer_norm_bias", None), eps)

    # --------------------------------------------------------------------------------------- merge
    @torch.no_grad()
    def merged_base(self) -> torch.nn.Module:
        """The base layer with W += (alpha / r) B A folded in (shard-local on both parallel kinds)."""
        update = (self.lora_b.float() @ self.lora_a.float()) * self.scale
        self.base.weight.add_(update.to(self.base.weight.dtype))
        return self.base

    # --------------------------------------------------------------------------------------- checkpoint
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """The base layer's entries under its own keys, plus the adapter sharded like the base weight."""
        metadata = metadata or {}
        out = self.base.sharded_state_dict(prefix=prefix, sharded_offsets=sharded_offsets, metadata=metadata)
        axis = {"lora_b": 0} if self.parallel == "column" else {"lora_a": 1}
        dp_cp = metadata.get("dp_cp_group") or parallel_state.get_data_parallel_group(with_context_parallel=True)
        own = make_sharded_tensors_for_checkpoint(
            {"lora_a": self.lora_a, "lora_b": self.lora_b}, prefix, axis, sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(), dp_cp_group=dp_cp,
        )
        if self.swiglu:  # B's rows are [gate shard; up shard] per rank, like W's
            key = prefix + "lora_b"
            own[key] = apply_swiglu_sharded_factory(own[key], sharded_offsets,
                                                    metadata.get("singleton_local_shards", False))
        out.update(own)
        return out


def _strip_base_prefix(module, state_dict, prefix, local_metadata):
    """state_dict(): `...linear_qkv.base.weight` -> `...linear_qkv.weight` (the unwrapped layer's names)."""
    inner = prefix + "base."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_base_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict(): the inverse of `_strip_base_prefix`."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest not in ADAPTER_PARAMS and not rest.startswith("base."):
            state_dict[prefix + "base." + rest] = state_dict.pop(key)


def wrap_linear_layers(gpt, config, targets, rank: int, alpha: float, dropout: float, seed: int = 0) -> int:
    """Replace each targeted linear of every decoder layer of `gpt` with a `LoraLinear`; returns the count."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"model.peft.lora.target_modules={list(targets)}: unknown {unknown}; "
                         f"choose from {sorted(TARGETS)}")
    if rank < 1:
        raise ValueError(f"model.peft.lora.rank={rank}; must be >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.peft.lora.dropout={dropout}; must be in [0, 1)")
    wrapped = 0
    for layer in gpt.decoder.layers:
        for parent_name in ("self_attention", "mlp"):
            parent = getattr(layer, parent_name)
            for name in targets:
                base = getattr(parent, name, None)
                if base is None or isinstance(base, LoraLinear):
                    continue
                global_layer = layer.layer_number  # 1-based across pipeline stages: same seed on any layout
                layer_seed = zlib.crc32(f"{seed}.{global_layer}.{parent_name}.{name}".encode())
                swiglu = name == "linear_fc1" and config.gated_linear_unit
                setattr(parent, name, LoraLinear(base, name, config, rank, alpha, dropout, swiglu, layer_seed))
                wrapped += 1
    return wrapped


def merge_and_unwrap(module: torch.nn.Module) -> int:
    """Fold every LoraLinear under `module` into its base layer and put the base back; returns the count."""
    merged = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLinear):
                setattr(parent, name, child.merged_base())
                merged += 1
    return merged


SCHEMES = ("lora",)


def lora_settings(cfg) -> Optional[dict]:
    """The validated LoRA settings of `model` config `cfg`, or None without PEFT."""
    peft = cfg.get("peft")
    scheme = peft.get("peft_scheme") if peft else None
    if scheme is None or str(scheme).lower() in ("none", "null", ""):
        return None
    if scheme not in SCHEMES:
        raise ValueError(f"model.peft.peft_scheme={scheme!r}; supported: {', '.join(SCHEMES)} (or null)")
    lc = peft.get("lora") or {}
    return {
        "rank": int(lc.get("rank", 8)),
        "alpha": float(lc.get("alpha", 16)),
        "dropout": float(lc.get("dropout", 0.0)),
        "targets": list(lc.get("target_modules") or TARGETS),
    }
