"""Spawn-safe helpers for the multi-process parallel tests (module-level functions only).

Ranks talk over gloo on a free localhost port; every test builds the same tiny megatron-core GPTModel
(built with our CPU layer spec) and compares against a single-process reference run.
"""
from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VOCAB = 128
SEQ = 16


def gpt_config(style: str, tp: int = 1, pp: int = 1, sequence_parallel: bool = False, num_layers: int = 2):
    from megatron.core.transformer.transformer_config import TransformerConfig

    common = dict(
        num_layers=num_layers, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sequence_parallel,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        pipeline_dtype=torch.float32, bias_dropout_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        init_method_std=0.02,
    )
    if style == "llama":
        return TransformerConfig(
            normalization="RMSNorm", activation_func=F.silu, gated_linear_unit=True, add_bias_linear=False,
            num_query_groups=2, **common,
        ), "rope"
    if style == "gpt":
        return TransformerConfig(
            normalization="LayerNorm", activation_func=F.gelu, gated_linear_unit=False, add_bias_linear=True,
            **common,
        ), "learned_absolute"
    raise ValueError(style)


def build_gpt(style: str, tp: int = 1, pp: int = 1, sequence_parallel: bool = False, seed: int = 1234,
              num_layers: int = 2):
    """The tiny GPTModel for this rank's place in the (already initialised) parallel layout."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from nemo_neva.compat.cpu import seed_all
    from nemo_neva.modules.layer_specs import build_decoder_spec

    config, pos = gpt_config(style, tp, pp, sequence_parallel, num_layers)
    seed_all(seed)
    return GPTModel(
        config=config,
        transformer_layer_spec=build_decoder_spec(config, transformer_engine=False),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type=pos,
    )


def batch(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    loss_mask = torch.ones(n, SEQ)
    loss_mask[:, : SEQ // 4] = 0
    return {
        "tokens": tokens, "labels": labels, "loss_mask": loss_mask,
        "position_ids": torch.arange(SEQ).expand(n, SEQ).clone(),
    }


def gather_tp_logits(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from vocab-parallel ones (identity at TP=1)."""
    from megatron.core import tensor_parallel

    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)


def _entry(rank, world_size, port, fn, args, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from nemo_neva.parallel.init import ensure_distributed

    try:
        ensure_distributed()
        out = fn(rank, world_size, *args)
        torch.save(out, os.path.join(result_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, result_dir: str, *args):
    """Run `fn(rank, world_size, *args)` on `world_size` spawned processes; return each rank's result."""
    from nemo_neva.parallel.init import free_port

    os.makedirs(result_dir, exist_ok=True)
    port = free_port()
    try:
        mp.spawn(_entry, args=(world_size, port, fn, args, result_dir), nprocs=world_size, join=True)
    except Exception as exc:
        errs = [open(os.path.join(result_dir, f)).read() for f in sorted(os.listdir(result_dir)) if f.endswith(".err")]
        raise RuntimeError("a rank failed:\n" + "\n".join(errs)) from exc
    return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def microbatches(n_micro: int, mbs: int, seed: int):
    return [batch(mbs, seed=seed * 1000 + i) for i in range(n_micro)]


def thd_microbatches(n_micro: int, mbs: int, seed: int):
    """The same micro-batches packed as THD: each row two samples (odd cut), positions restarting per sample,
    rows concatenated to [1, mbs*SEQ] with megatron-core PackedSeqParams (as MegatronNevaModel.to_thd)."""
    from nemo_neva.data.packing import packed_seq_params

    cut = SEQ // 3 | 1
    segments = (torch.arange(SEQ) >= cut).long().expand(mbs, SEQ)
    positions = torch.cat([torch.arange(cut), torch.arange(SEQ - cut)]).expand(mbs, SEQ)
    out = []
    for b in microbatches(n_micro, mbs, seed):
        thd = {k: b[k].reshape(1, -1) for k in ("tokens", "labels", "loss_mask")}
        out.append(dict(thd, position_ids=positions.reshape(1, -1), packed_seq_params=packed_seq_params(segments)))
    return out


def forward_step(data_iterator, model):
    """megatron-core forward_step_func: per-token loss from GPTModel, masked mean in the loss function."""
    b = next(data_iterator)
    out = model(b["tokens"], b["position_ids"], attention_mask=None, labels=b["labels"],
                packed_seq_params=b.get("packed_seq_params"))
    mask = b["loss_mask"]

    def loss_func(output_tensor):
        loss = (output_tensor.float() * mask).sum() / mask.sum()
        return loss, {"loss": loss.detach().clone()}

    return out, loss_func


def ddp_forward_backward(model, data: list, mbs: int, seq: int = SEQ, forward_only: bool = False):
    """megatron-core DDP around `model`, one schedule pass over `data`; returns (ddp, micro-batch losses)."""
    from nemo_neva.training.optimizer import build_megatron_ddp
    from nemo_neva.training.schedule import run_forward_backward

    ddp = build_megatron_ddp(model, {})
    losses = run_forward_backward(ddp, iter(data), forward_step, len(data), seq, mbs, 64, forward_only=forward_only)
    return ddp, [d["loss"] for d in losses]


def unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def save_grads_as_checkpoint(ddp, ckpt_dir):
    """Write the reduced gradients (DDP main_grad) in place of the weights as a dist checkpoint, so that
    megatron-core's resharding can bring a TP/PP-sharded gradient back to the TP=1/PP=1 layout."""
    from nemo_neva.parallel.dist_ckpt import save_sharded

    module = unwrap(ddp)
    with torch.no_grad():
        for p in module.parameters():
            p.data.copy_(p.main_grad)
    save_sharded(module.sharded_state_dict(), ckpt_dir)


def load_full(style, ckpt_dir, num_layers=2):
    """A TP=1/PP=1 model's named tensors from a dist checkpoint (the current layout must be TP=1/PP=1)."""
    from nemo_neva.parallel.dist_ckpt import load_sharded

    m = build_gpt(style, seed=4321, num_layers=num_layers)
    m.load_state_dict(load_sharded(m.sharded_state_dict(), ckpt_dir), strict=True)
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def main_grads(ddp):
    return {k: p.main_grad.detach().clone() for k, p in unwrap(ddp).named_parameters()}


def assert_dicts_close(a, b, rtol, atol):
    assert a.keys() == b.keys(), (sorted(set(a) ^ set(b)))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def assert_adam_trained_close(params, ref_params, ref_grads, lr, steps, tight=1e-6, max_outlier_fraction=1e-3):
    """Parameters after `steps` Adam steps vs a reference run of the same steps in another layout.

    A different reduction order (DP/TP split, Intel vs AMD) changes a gradient by fp32 rounding (~1e-7
    relative). Adam divides by sqrt(v), so an element whose gradient is well above that noise moves the same in
    both runs (to ~1e-7 of lr), while one whose gradient is itself near zero can move by up to ~lr per step
    either way. Hence: every element agrees within `tight` unless the reference gradient there was tiny
    (< 1e-3 of its tensor's largest) at some step; such outliers are few; none exceeds 2 * lr * steps (Adam's
    normalised step is at most ~1 per step at these betas, 2 leaves room for weight decay). A real bug (a
    missed reduction, a wrong optimizer shard) moves elements with large gradients and fails the first check.
    `ref_grads` is one dict of reference gradients per step, taken before the optimizer step.
    """
    assert params.keys() == ref_params.keys(), sorted(set(params) ^ set(ref_params))
    outliers = total = 0
    for k, ref in ref_params.items():
        diff = (params[k] - ref).abs()
        assert float(diff.max()) <= 2 * lr * steps, (k, float(diff.max()))
        tiny = torch.zeros_like(diff, dtype=torch.bool)
        for grads in ref_grads:
            g = grads[k].abs()
            tiny |= g < 1e-3 * g.max()
        bad = (diff > tight) & ~tiny
        assert not bad.any(), f"{k}: {int(bad.sum())} elements with ordinary gradients differ by up to " \
                              f"{float(diff[bad].max()):.3g} (> {tight})"
        outliers += int((diff > tight).sum())
        total += diff.numel()
    assert outliers <= max_outlier_fraction * total, (outliers, total)
