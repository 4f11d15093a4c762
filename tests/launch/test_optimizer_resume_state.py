"""Optimizer state through a training checkpoint, 2 data-parallel processes (gloo): after save and load into a
freshly built model + optimizer, every piece of Adam state equals the live one, and the next updates match
bit for bit. Covers megatron-core's distributed optimizer (torch Adam, no Apex/TE: per-parameter `step`) and
the plain one."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "parallel"))
import mp_utils as U  # noqa: E402

OPT = dict(optimizer="adam", lr=1e-2, weight_decay=0.01, clip_grad=1.0, betas=[0.9, 0.95])
TRAINED, AFTER = 3, 2


def _build(distributed, seed):
    from nemo_neva.training.optimizer import build_megatron_ddp_and_optimizer

    model = U.build_gpt("llama", seed=seed)
    ddp, opt = build_megatron_ddp_and_optimizer(model, dict(OPT, use_distributed_optimizer=distributed))
    return model, ddp, opt


def _train_step(rank, ddp, opt, step):
    from nemo_neva.training.optimizer import step_optimizer
    from nemo_neva.training.schedule import run_forward_backward

    mine = U.microbatches(2, 1, seed=100 + step)[rank:rank + 1]
    ddp.zero_grad_buffer()
    opt.zero_grad()
    run_forward_backward(ddp, iter(mine), U.forward_step, 1, U.SEQ, 1, 64, forward_only=False)
    ok, _, _ = step_optimizer(opt)
    assert ok


def _sharded(model, opt, is_loading):
    from nemo_neva.checkpoint.training_checkpoint import optimizer_sharded_state

    model_sd = model.sharded_state_dict(prefix="model.")
    return {"model": model_sd, "optimizer": optimizer_sharded_state(opt, model_sd, is_loading)}


def _adam_state(opt):
    """(param group settings, [(main param, its state)]) of every torch optimizer inside `opt`."""
    groups, params = [], []
    for o in getattr(opt, "chained_optimizers", [opt]):
        inner = o.optimizer
        for g in inner.param_groups:
            groups.append({k: v for k, v in g.items() if k not in ("params", "step")})
            params += [(p, inner.state[p]) for p in g["params"]]
    return groups, params


def _round_trip(rank, world_size, root, distributed):
    from nemo_neva.checkpoint.training_checkpoint import load_optimizer_state
    from nemo_neva.parallel.dist_ckpt import load_sharded, save_sharded
    from nemo_neva.parallel.init import initialize_model_parallel_from_cfg

    initialize_model_parallel_from_cfg(tp=1, pp=1, num_attention_heads=4, num_query_groups=2, num_layers=2)
    ckpt = os.path.join(root, "dist" if distributed else "plain")
    model, ddp, opt = _build(distributed, seed=31)
    for step in range(TRAINED):
        _train_step(rank, ddp, opt, step)
    save_sharded(_sharded(model, opt, is_loading=False), ckpt)

    resumed, ddp2, opt2 = _build(distributed, seed=77)
    loaded = load_sharded(_sharded(resumed, opt2, is_loading=True), ckpt)
    resumed.load_state_dict({k[len("model."):]: v for k, v in loaded["model"].items()}, strict=False)
    load_optimizer_state(opt2, loaded["optimizer"])

    (groups, live), (groups2, restored) = _adam_state(opt), _adam_state(opt2)
    assert groups2 == groups
    assert len(restored) == len(live) > 0
    steps = set()
    for (p, s), (p2, s2) in zip(live, restored):
        torch.testing.assert_close(p2, p, rtol=0, atol=0)  # main (fp32) params
        assert s2.keys() == s.keys() and {"exp_avg", "exp_avg_sq", "step"} <= set(s)
        for k in s:
            assert s2[k].dtype == s[k].dtype, k
            torch.testing.assert_close(s2[k], s[k], rtol=0, atol=0, msg=k)
        steps.add(s2["step"].data_ptr())
        assert float(s2["step"]) == TRAINED
    assert len(steps) == len(restored), "torch Adam increments each parameter's step in place"

    for step in range(TRAINED, TRAINED + AFTER):
        _train_step(rank, ddp, opt, step)
        _train_step(rank, ddp2, opt2, step)
    return {"live": {k: p.detach().clone() for k, p in model.named_parameters()},
            "resumed": {k: p.detach().clone() for k, p in resumed.named_parameters()},
            "moved": [k for k, p in model.named_parameters()
                      if not torch.equal(p, dict(U.build_gpt("llama", seed=31).named_parameters())[k])]}


def _both(rank, world_size, root):
    return {kind: _round_trip(rank, world_size, root, kind == "distributed") for kind in ("distributed", "plain")}


def test_adam_state_round_trips_and_later_updates_match(tmp_path):
    for rank_out in U.run_ranks(_both, 2, str(tmp_path), str(tmp_path)):
        for kind, out in rank_out.items():
            assert len(out["moved"]) == len(out["live"]), kind
            U.assert_dicts_close(out["resumed"], out["live"], rtol=0, atol=0)
