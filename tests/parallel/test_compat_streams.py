"""compat/cpu answers the CUDA stream query megatron-core 0.19 added to DDP's gradient sync.

megatron-core 0.19's `_ParamAndGradBucketGroup.start_grad_sync` (called by `finish_grad_sync`) asks
`torch.cuda.current_stream()` to wait for CUDA-graph events; without CUDA that raised "Found no NVIDIA driver"
(examples/neva_pretrain.py stopped at its first step). Here megatron-core's own DDP runs that sync on CPU and
its reduced gradients equal plain autograd's. On 0.16.1 the same code path runs without the query.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mp_utils as U  # noqa: E402

# not optional: the CPU answers are switched off where CUDA exists
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the compat answers exist only without CUDA")


def _sync(rank, world_size):
    from nemo_neva.parallel.init import initialize_model_parallel_from_cfg
    from nemo_neva.training.optimizer import build_megatron_ddp

    initialize_model_parallel_from_cfg(tp=1, pp=1)
    stream = torch.cuda.current_stream()
    model = U.build_gpt("gpt", seed=5)
    ddp = build_megatron_ddp(model, {})
    ddp.zero_grad_buffer()
    b = U.batch(2, seed=4)
    per_token = ddp(b["tokens"], b["position_ids"], attention_mask=None, labels=b["labels"])
    ((per_token * b["loss_mask"]).sum() / b["loss_mask"].sum()).backward()
    ddp.finish_grad_sync()  # megatron-core's bucket sync, with its current_stream() wait on 0.19
    twin = U.build_gpt("gpt", seed=5)
    ((twin(b["tokens"], b["position_ids"], attention_mask=None, labels=b["labels"]) * b["loss_mask"]).sum()
     / b["loss_mask"].sum()).backward()
    return dict(stream=f"{type(stream).__module__}.{type(stream).__name__}", grads=U.main_grads(ddp),
                ref={k: p.grad.clone() for k, p in twin.named_parameters()})


def test_ddp_grad_sync_runs_on_cpu_and_reduces_like_autograd(tmp_path):
    (r,) = U.run_ranks(_sync, 1, str(tmp_path / "res"))
    assert r["stream"] == "torch.cpu.Stream"  # torch.cpu.Stream: its waits are no-ops on the one CPU stream
    # one rank: DDP's all-reduce is an identity and the fp32 main_grad buffer holds autograd's fp32 grads
    # (grad_reduce_in_fp32); tolerance 0.
    U.assert_dicts_close(r["grads"], r["ref"], rtol=0, atol=0)
