"""megatron-core `RowParallelLinear` that hands its own tensor-parallel group to the linear function.

Why: megatron-core 0.16.1's `RowParallelLinear.forward` passes `tp_group=None` to its linear function, which
then looks the default group up again and (on rank 0) issues a `DeprecationWarning` on every call. The
group it finds is this layer's `tp_group`, and a row-parallel linear uses it for nothing else (no sequence
gather, no dgrad all-reduce: megatron-core passes `sequence_parallel=False, allreduce_dgrad=False`), so
passing it changes no result. It removes two Python calls and a `warnings.warn` per linear per step
(decoding runs ~8 of them per token) and a graph break for `torch.compile`.
"""
from __future__ import annotations

from megatron.core.tensor_parallel.layers import RowParallelLinear


class RowParallelLinearOwnGroup(RowParallelLinear):
    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group") is None and self.tp_group is not None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)
