"""Dist checkpoints through megatron-core on CPU: round trip at TP=1 and resharding TP=1 <-> TP=2."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mp_utils import batch, build_gpt, gather_tp_logits, run_ranks  # noqa: E402


def _logits(model):
    b = batch()
    model.eval()
    with torch.no_grad():
        out = model(b["tokens"], b["position_ids"], attention_mask=None)
    return gather_tp_logits(out)


def _full_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and "_extra_state" not in k}


def test_round_trip_single_process(tmp_path):
    """World size 1, no process group beforehand: save then load gives back exactly the same tensors."""
    run_ranks(_round_trip, 1, str(tmp_path / "res"), str(tmp_path / "ckpt"))


def _round_trip(rank, world_size, ckpt_dir):
    import torch.distributed as dist

    from nemo_neva.parallel.dist_ckpt import load_sharded, save_sharded
    from nemo_neva.parallel.init import initialize_model_parallel_from_cfg

    # no process group and no launcher variables: ensure_distributed (called by init / save / load) must
    # bring up a world-size-1 gloo group on a free port by itself
    dist.destroy_process_group()
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(var, None)
    for style in ("llama", "gpt"):
        if style == "llama":
            assert not dist.is_initialized()
        else:
            assert dist.get_backend() == "gloo" and dist.get_world_size() == 1
        initialize_model_parallel_from_cfg(tp=1, pp=1, num_attention_heads=4, num_query_groups=2, num_layers=2)
        src = build_gpt(style, seed=1)
        save_sharded(src.sharded_state_dict(), os.path.join(ckpt_dir, style))
        dst = build_gpt(style, seed=2)
        before = _full_state(dst)
        assert any(not torch.equal(before[k], v) for k, v in _full_state(src).items())
        dst.load_state_dict(load_sharded(dst.sharded_state_dict(), os.path.join(ckpt_dir, style)), strict=True)
        a, b = _full_state(src), _full_state(dst)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
        assert torch.equal(_logits(src), _logits(dst))


def _reshard(rank, world_size, ckpt_dir, style):
    from nemo_neva.parallel.dist_ckpt import load_sharded, save_sharded
    from nemo_neva.parallel.init import initialize_model_parallel_from_cfg

    # 1. TP=1 (two data-parallel replicas) -> save
    initialize_model_parallel_from_cfg(tp=1, pp=1, num_attention_heads=4, num_query_groups=2, num_layers=2)
    ref = build_gpt(style, tp=1, seed=7)
    ref_logits = _logits(ref)
    ref_state = _full_state(ref)
    save_sharded(ref.sharded_state_dict(), os.path.join(ckpt_dir, "tp1"))

    # 2. TP=2 loads the TP=1 checkpoint -> same logits; then save at TP=2
    initialize_model_parallel_from_cfg(tp=2, pp=1, num_attention_heads=4, num_query_groups=2, num_layers=2)
    tp2 = build_gpt(style, tp=2, seed=99)
    tp2_fresh = _logits(tp2)
    tp2.load_state_dict(load_sharded(tp2.sharded_state_dict(), os.path.join(ckpt_dir, "tp1")), strict=True)
    tp2_logits = _logits(tp2)
    save_sharded(tp2.sharded_state_dict(), os.path.join(ckpt_dir, "tp2"))

    # 3. TP=1 loads the TP=2 checkpoint -> same logits and bit-identical weights as the original
    initialize_model_parallel_from_cfg(tp=1, pp=1, num_attention_heads=4, num_query_groups=2, num_layers=2)
    back = build_gpt(style, tp=1, seed=123)
    back.load_state_dict(load_sharded(back.sharded_state_dict(), os.path.join(ckpt_dir, "tp2")), strict=True)
    back_state = _full_state(back)
    same_weights = all(torch.equal(ref_state[k], back_state[k]) for k in ref_state)
    return {"ref": ref_logits, "tp2_fresh": tp2_fresh, "tp2": tp2_logits, "back": _logits(back),
            "same_weights": same_weights and ref_state.keys() == back_state.keys()}


def _check_reshard(results):
    for r in results:
        assert not torch.allclose(r["tp2_fresh"], r["ref"], atol=1e-3)  # the load really changed something
        torch.testing.assert_close(r["tp2"], r["ref"], rtol=1e-5, atol=1e-5)  # TP=2 matmul split: fp32 rounding only
        assert torch.equal(r["back"], r["ref"])
        assert r["same_weights"]


def test_reshard_tp1_tp2_llama(tmp_path):
    _check_reshard(run_ranks(_reshard, 2, str(tmp_path / "res"), str(tmp_path / "ckpt"), "llama"))


def test_reshard_tp1_tp2_gpt(tmp_path):
    _check_reshard(run_ranks(_reshard, 2, str(tmp_path / "res"), str(tmp_path / "ckpt"), "gpt"))
