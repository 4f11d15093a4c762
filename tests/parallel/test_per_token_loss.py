"""The training loss is a per-token mean over the whole global batch: with micro-batches of very different
answer lengths, gradient accumulation (DP=1, 4 micro-batches) and DP=2 (2 gloo ranks x 2 micro-batches) give
the loss and the gradients of the whole batch computed at once by plain autograd, before any optimizer step.

Tolerance: the gradients are fp32 sums of the same per-token terms in another order (micro-batches, ranks,
megatron-core's DDP buckets), which moves them by ~1e-6 relative on any CPU (Intel and AMD round
differently, not more; 1.2e-6 of a tensor's largest gradient here). Per tensor the check allows 3e-5 of that
tensor's largest gradient plus 1e-4 relative: ~25x above that noise, and far below the error it guards
against -- averaging per-micro-batch means weighs these micro-batches' tokens 1/4 to 1/30 apart, which moves
the gradients by more than 10 % of a tensor's largest (asserted on the old normalisation, so the test cannot
pass by comparing nothing; here it is ~280 %).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mp_utils as U  # noqa: E402

GLOBAL, SEQ = 8, 48
ANSWER_TOKENS = [1, 26, 2, 19, 3, 1, 24, 6]  # per sample: micro-batches of 2 hold 27, 21, 4 and 30 tokens


def _cfg(mbs: int):
    from tests.model.helpers import tiny_model_cfg

    return tiny_model_cfg(**{"mm_cfg.llm.freeze": False, "micro_batch_size": mbs, "global_batch_size": GLOBAL,
                             "optim.sched": None})


def _model(mbs: int):
    from nemo_neva import build_model

    torch.manual_seed(7)
    model = build_model(_cfg(mbs))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # same weights in every process, whatever the init order
        for p in model.model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model.train()


def global_batch(model):
    from tests.model.helpers import batch_for

    batch = batch_for(model, n=GLOBAL, seq=SEQ, seed=5)
    start = 1 + model.tokens_per_image
    batch["loss_mask"].zero_()
    for row, n in enumerate(ANSWER_TOKENS):
        batch["loss_mask"][row, start:start + n] = 1.0
    return batch


def _trainable(model):
    return {k: p for k, p in model.model.named_parameters() if p.requires_grad}


def _reference(rank, world_size):
    """The whole global batch at once, plain autograd: sum of per-token losses / number of loss tokens."""
    model = _model(GLOBAL)
    b = global_batch(model)
    mask = b["loss_mask"]

    def per_token():
        return model.model(b["tokens"], b["position_ids"], images=b["images"], labels=b["labels"],
                           num_images=b["num_images"]).float()

    def grads_of(loss):
        model.zero_grad()
        loss.backward()
        return {k: p.grad.detach().clone() for k, p in _trainable(model).items()}

    loss = (per_token() * mask).sum() / mask.sum()
    grads = grads_of(loss)
    # what averaging per-micro-batch means (the old normalisation) gives, for the effect size
    pt = per_token()
    old = torch.stack([(pt[i:i + 2] * mask[i:i + 2]).sum() / mask[i:i + 2].sum() for i in range(0, GLOBAL, 2)]).mean()
    return {"loss": loss.detach(), "grads": grads, "old_loss": old.detach(), "old_grads": grads_of(old)}


def _megatron(rank, world_size, mbs):
    """The training path: this rank's slice of the global batch in micro-batches of `mbs` through
    megatron-core's schedule and DDP; gradients read from DDP's main_grad after the reduction, before the
    optimizer step."""
    from megatron.core import parallel_state as ps

    model = _model(mbs)
    model.configure_optimizers()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    assert dp == world_size
    full = global_batch(model)
    per_rank = GLOBAL // dp
    rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    batch = {k: v[rows] for k, v in full.items()}
    loss = model.forward_backward(batch)
    return {"loss": loss.detach(), "grads": {k: p.main_grad.detach().clone() for k, p in _trainable(model).items()}}


def _close(got, want):
    for k in want:
        scale = float(want[k].abs().max())
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=3e-5 * scale, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def reference():
    ref = _reference(0, 1)
    # the micro-batches' token counts differ enough that the old normalisation is far off
    assert abs(float(ref["old_loss"]) - float(ref["loss"])) > 1e-4 * float(ref["loss"])  # 10x the loss check
    worst = max(float((ref["old_grads"][k] - ref["grads"][k]).abs().max() / ref["grads"][k].abs().max())
                for k in ref["grads"])
    assert worst > 0.1, worst
    return ref


def _check(results, reference):
    for r in results:
        assert sorted(r["grads"]) == sorted(reference["grads"]) and len(r["grads"]) > 10
        _close(r["grads"], reference["grads"])
        torch.testing.assert_close(r["loss"], reference["loss"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("mbs", [GLOBAL, 2], ids=["one_microbatch", "accumulate4"])
def test_one_rank_loss_and_grads_equal_the_whole_batch(reference, mbs):
    _check([_megatron(0, 1, mbs)], reference)


def test_two_data_parallel_ranks_loss_and_grads_equal_the_whole_batch(reference, tmp_path):
    _check(U.run_ranks(_megatron, 2, str(tmp_path), 2), reference)
