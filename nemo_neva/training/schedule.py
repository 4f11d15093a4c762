"""megatron-core's forward-backward schedules (no pipelining, or 1F1B across pipeline stages), run so that
they also work on CPU (their hard-coded CUDA placements are redirected by `nemo_neva.compat.cpu`)."""
from __future__ import annotations

import functools
from typing import Callable, Iterator, List, Optional, Sequence, Union

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_neva.compat.cpu import cuda_free, cuda_free_paused


def _unwrap_config(module):
    while not hasattr(module, "config") and hasattr(module, "module"):
        module = module.module
    return getattr(module, "config", None)


def _without_compat_mode(forward_step_func: Callable) -> Callable:
    """`forward_step_func` run with `cuda_free`'s mode paused: the schedule around it needs the mode (it
    builds tensors on "cuda"), the model forward does not, and the mode costs Python per torch call."""
    @functools.wraps(forward_step_func)
    def step(*args, **kwargs):
        with cuda_free_paused():
            return forward_step_func(*args, **kwargs)

    return step


def run_forward_backward(
    model_chunks: Union[torch.nn.Module, Sequence[torch.nn.Module]],
    data_iterator: Union[Iterator, List[Iterator]],
    forward_step_func: Callable,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    hidden_size: Optional[int] = None,
    forward_only: bool = False,
) -> list:
    """One pass of megatron-core's schedule over `num_microbatches` micro-batches.

    `model_chunks`: this rank's model (a GPTModel, or mcore DDP around it), or a list of chunks.
    `forward_step_func(data_iterator, model) -> (output_tensor, loss_func)` as megatron-core defines it;
    `loss_func(output_tensor)` returns `(loss, {"name": value, ...})` (or megatron-core's 3-tuple form).
    `seq_length` is the sequence length of the tensors exchanged between pipeline stages (after any image
    splice; divided by TP inside megatron-core when sequence parallel), `hidden_size` is checked against the
    model's config when given. Returns the list of loss dicts (filled on the last pipeline stage only;
    empty elsewhere). Gradients are reduced via `config.finalize_model_grads_func` when the model has one.
    """
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    config = _unwrap_config(chunks[0])
    if hidden_size is not None and config is not None and config.hidden_size != hidden_size:
        raise ValueError(f"hidden_size={hidden_size} but the model's config has hidden_size={config.hidden_size}")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches} must be >= 1")
    with cuda_free():
        return get_forward_backward_func()(
            forward_step_func=_without_compat_mode(forward_step_func),
            data_iterator=data_iterator,
            model=chunks,
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )
