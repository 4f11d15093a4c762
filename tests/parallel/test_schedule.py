"""run_forward_backward drives megatron-core's no-pipelining schedule on CPU (forward-only and training)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mp_utils as U  # noqa: E402


def _schedule(rank, world_size):
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    from nemo_neva.parallel.init import initialize_model_parallel_from_cfg
    from nemo_neva.training.optimizer import build_megatron_ddp
    from nemo_neva.training.schedule import run_forward_backward

    initialize_model_parallel_from_cfg(tp=1, pp=1)
    assert get_forward_backward_func() is forward_backward_no_pipelining
    model = U.build_gpt("llama", seed=3)
    data = U.microbatches(3, 2, seed=9)
    # reference: plain PyTorch forward on the same micro-batches
    with torch.no_grad():
        expected = []
        for b in data:
            per_token = model(b["tokens"], b["position_ids"], attention_mask=None, labels=b["labels"])
            expected.append((per_token * b["loss_mask"]).sum() / b["loss_mask"].sum())
    fwd = run_forward_backward(model, iter(data), U.forward_step, 3, U.SEQ, 2, 64, forward_only=True)
    assert all(p.grad is None for p in model.parameters())
    try:
        run_forward_backward(model, iter(data), U.forward_step, 3, U.SEQ, 2, hidden_size=32, forward_only=True)
        raise AssertionError("hidden_size mismatch not reported")
    except ValueError as err:
        assert "hidden_size=32" in str(err)
    ddp = build_megatron_ddp(model, {})
    ddp.zero_grad_buffer()
    train = run_forward_backward([ddp], iter(data), U.forward_step, 3, U.SEQ, 2, forward_only=False)
    # the schedule divides each micro-batch loss by num_microbatches before backward: grad of the mean
    # (on an identically built, un-wrapped twin: DDP's hooks move .grad into its main_grad buffer)
    twin = U.build_gpt("llama", seed=3)
    torch.stack([(twin(b["tokens"], b["position_ids"], attention_mask=None, labels=b["labels"]) * b["loss_mask"]).sum()
                 / b["loss_mask"].sum() for b in data]).mean().backward()
    ref = {k: p.grad.clone() for k, p in twin.named_parameters()}
    return dict(expected=torch.stack(expected), fwd=torch.stack([d["loss"] for d in fwd]),
                train=torch.stack([d["loss"] for d in train]), grads=U.main_grads(ddp), ref=ref)


def test_run_forward_backward_matches_plain_pytorch(tmp_path):
    (r,) = U.run_ranks(_schedule, 1, str(tmp_path / "res"))
    torch.testing.assert_close(r["fwd"], r["expected"], rtol=0, atol=0)
    # fp32, the same ops with megatron-core's DDP buffers around them: measured 0.0 for the losses and <= 7.5e-9 for
    # the gradients (up to 0.3); the bounds only admit another reduction order (grad buckets summed in other groups)
    torch.testing.assert_close(r["train"], r["expected"], rtol=1e-6, atol=1e-6)
    U.assert_dicts_close(r["grads"], r["ref"], rtol=1e-5, atol=1e-7)
