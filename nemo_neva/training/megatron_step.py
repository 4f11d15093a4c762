"""Training through megatron-core: its DDP (optionally the distributed optimizer), optimizer, LR schedule
and forward-backward schedules (pipelined or not), driven from Lightning's manual optimization.

Lightning owns the loop, logging and checkpoint callbacks; megatron-core owns everything that depends on
the parallel layout. `MegatronOptimizerAdapter` lets Lightning count optimizer steps on a megatron optimizer.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from nemo_neva.training.optimizer import build_megatron_ddp_and_optimizer, step_optimizer

_SCHEDULES = {"cosineannealing": "cosine", "cosine": "cosine", "linear": "linear", "constant": "constant"}
_OPTIMIZERS = {"adam": ("adam", False), "adamw": ("adam", False), "distributed_fused_adam": ("adam", True),
               "sgd": ("sgd", False)}


class MegatronOptimizerAdapter(torch.optim.Optimizer):
    """A torch.optim.Optimizer face on a megatron-core optimizer, so Lightning can step and count it."""

    def __init__(self, megatron_optimizer, scheduler: OptimizerParamScheduler):
        # Deliberately no super().__init__: parameters and state live in the megatron optimizer.
        self.megatron_optimizer = megatron_optimizer
        self.scheduler = scheduler
        self.defaults = {}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self.last_grad_norm = None

    @property
    def param_groups(self):
        return self.megatron_optimizer.param_groups

    @property
    def state(self):
        return self.megatron_optimizer.state

    def zero_grad(self, set_to_none: bool = True):
        self.megatron_optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        if closure is not None:
            closure()
        ok, grad_norm, _ = step_optimizer(self.megatron_optimizer)
        if ok:
            self.scheduler.step(increment=1)
        self.last_grad_norm = grad_norm
        return ok

    def state_dict(self):
        return {"optimizer": self.megatron_optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state_dict):
        self.megatron_optimizer.load_state_dict(state_dict["optimizer"])
        self.scheduler.load_state_dict(state_dict["scheduler"])


def schedule_steps(trainer) -> int:
    """The optimizer steps a Lightning run will take (one per training batch: megatron-core accumulates the
    micro-batches, Lightning never does): trainer.max_steps, or max_epochs x batches per epoch
    (limit_train_batches applied), whichever ends first. Raises when the run has no end to decay towards."""
    if trainer.max_steps is not None and trainer.max_steps > 0 and (trainer.max_epochs is None
                                                                   or trainer.max_epochs < 0):
        return int(trainer.max_steps)
    if trainer.max_epochs is None or trainer.max_epochs < 0:
        raise ValueError("the LR schedule needs the run's length: set trainer.max_steps, or trainer.max_epochs "
                         "(with training data of known length), or model.optim.sched.max_steps")
    steps = trainer.estimated_stepping_batches  # Lightning: max_epochs x train batches, capped by max_steps
    if not math.isfinite(steps) or steps <= 0:
        raise ValueError(f"trainer.max_epochs={trainer.max_epochs}, but the number of optimizer steps per epoch is "
                         "unknown (training data without a length); set trainer.max_steps or "
                         "model.optim.sched.max_steps")
    return int(steps)


def optimizer_settings(optim_cfg) -> dict:
    """`model.optim` (NeMo-style names) -> the keys of `nemo_neva.training.optimizer`."""
    name = str(optim_cfg.get("name", "adam")).lower()
    if name not in _OPTIMIZERS:
        raise ValueError(f"model.optim.name={name!r}; supported: {sorted(_OPTIMIZERS)}")
    kind, distributed = _OPTIMIZERS[name]
    sched_cfg = optim_cfg.get("sched") or {}
    return {
        "optimizer": kind,
        "use_distributed_optimizer": distributed,
        "lr": optim_cfg.lr,
        "min_lr": sched_cfg.get("min_lr", optim_cfg.lr) if sched_cfg else optim_cfg.lr,
        "weight_decay": optim_cfg.get("weight_decay", 0.0),
        "betas": list(optim_cfg.get("betas", [0.9, 0.999])),
        "eps": optim_cfg.get("eps", 1e-8),
        "clip_grad": optim_cfg.get("clip_grad", 1.0) or 0.0,
    }


def build_training(module, optim_cfg, max_steps: int):
    """megatron-core DDP + optimizer (nemo_neva.training.optimizer) + LR schedule, as a Lightning optimizer.

    The loss is a per-token mean over the whole global batch (megatron-core's `calculate_per_token_loss`: each
    micro-batch's loss function returns its loss sum and token count, gradients are summed over micro-batches
    and data-parallel ranks and divided by the global batch's loss tokens), so a sample weighs the same
    whichever micro-batch or rank it lands in."""
    settings = dict(optimizer_settings(optim_cfg), calculate_per_token_loss=True)
    ddp, optimizer = build_megatron_ddp_and_optimizer(module, settings)
    sched_cfg = optim_cfg.get("sched") or {}
    style = _SCHEDULES.get(str(sched_cfg.get("name", "constant")).lower()) if sched_cfg else "constant"
    if style is None:
        raise ValueError(f"model.optim.sched.name={sched_cfg.get('name')!r}; supported: {sorted(_SCHEDULES)}")
    warmup = sched_cfg.get("warmup_steps", 0) if sched_cfg else 0
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else settings["lr"],
        max_lr=settings["lr"],
        min_lr=settings["min_lr"],
        lr_warmup_steps=warmup,
        lr_decay_steps=max(max_steps, warmup + 1),
        lr_decay_style=style,
        start_wd=settings["weight_decay"],
        end_wd=settings["weight_decay"],
        wd_incr_steps=max(max_steps, 1),
        wd_incr_style="constant",
    )
    return ddp, MegatronOptimizerAdapter(optimizer, scheduler)


def reduce_loss_sums(losses: Iterable[dict]) -> torch.Tensor:
    """[loss sum, loss tokens] of a step's micro-batches (`loss_func`'s `{"loss": [sum, tokens]}`), summed over
    the last pipeline stage's data-parallel ranks: the whole global batch's, shared with every stage."""
    losses = list(losses)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and losses:
        value = torch.stack([d["loss"].float().reshape(2) for d in losses]).sum(0).to(device)
    else:
        value = torch.zeros(2, device=device)
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(value, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(
            value, src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return value


def per_token_mean(sums: torch.Tensor) -> torch.Tensor:
    """loss sum / loss tokens ([2] from `reduce_loss_sums`); no loss token gives a finite 0."""
    return sums[0] / sums[1].clamp(min=1)


def num_microbatches(global_batch_size: int, micro_batch_size: int, dp: int) -> int:
    """global_batch_size = micro_batch_size x data-parallel size x micro-batches per step."""
    per_step = micro_batch_size * dp
    if global_batch_size % per_step:
        raise ValueError(
            f"model.global_batch_size={global_batch_size} must be a multiple of "
            f"micro_batch_size x data-parallel size = {per_step}"
        )
    return global_batch_size // per_step


def masked_loss_sum(per_token: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-token losses over trainable tokens in fp32, their number as an int tensor)."""
    mask = loss_mask.to(per_token.dtype)
    return (per_token.float() * mask.float()).sum(), loss_mask.detach().sum().round().to(torch.int)


# Batch keys with one entry per image (in sample order), not per sample: `images`, `image_sizes` [n, 2]
# (original height, width) of a tiled model's images (model.mm_cfg.image_tiling) and `video_frames` [n]
# (which images are video frames, model.mm_cfg.video.pool).
PER_IMAGE = ("images", "image_sizes", "video_frames")


def pad_to_microbatches(batch: dict, micro_batch_size: int) -> dict:
    """A batch whose size is not a multiple of `micro_batch_size` (an evaluation set's last batch) filled up
    with copies of its last sample whose loss_mask is 0: valid inputs (its image included) that add no loss
    and no loss token, so every real sample counts once and the micro-batches keep their fixed shape."""
    n = batch["tokens"].shape[0]
    extra = -n % micro_batch_size
    if not extra:
        return batch
    rows = torch.cat([torch.arange(n), torch.full((extra,), n - 1)])
    out = {k: (v[rows.to(v.device)] if k not in PER_IMAGE and torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n
               else v) for k, v in batch.items()}
    out["loss_mask"] = out["loss_mask"].clone()
    out["loss_mask"][n:] = 0
    last = int(batch["num_images"][-1]) if batch.get("images") is not None else 0
    for key in PER_IMAGE:
        v = batch.get(key)
        if v is not None and last:
            out[key] = torch.cat([v] + [v[v.shape[0] - last:]] * extra)
    return out


def sequence_multiple(tp: int, sequence_parallel: bool, fp8: bool) -> int:
    """What a batch's length must be a multiple of for the layout. Sequence parallelism splits the sequence
    evenly over the TP ranks (megatron-core asserts S % TP == 0). Transformer Engine's FP8 GEMMs need every
    GEMM input's token count to be a multiple of 8 (`assert_dim_for_fp8_exec`); under sequence parallelism a
    rank's layer-norm + linear input is its S/TP share, so S must then be a multiple of 8 x TP."""
    sp = sequence_parallel and tp > 1
    if fp8:
        return 8 * tp if sp else 8
    return tp if sp else 1


def pad_sequence_to_multiple(batch: dict, multiple: int, pad_id: int = 0) -> dict:
    """A batch [B, S] lengthened to S' = S rounded up to `multiple` (`sequence_multiple`) at the end of every
    row: pad tokens with loss_mask 0 and label 0, so the loss, its token count and the gradients do not change
    (the model is causal, so no real token sees the padding). Positions repeat the row's last one (always in the
    position table); a packed row's padding is a segment of its own; a dense mask is extended to hide it."""
    seq = batch["tokens"].shape[1]
    extra = -seq % multiple
    if not extra:
        return batch
    out = dict(batch)

    def grow(key, fill):
        v = batch[key]
        return torch.cat([v, fill.to(v.dtype).to(v.device).expand(v.shape[0], extra)], dim=1)

    out["tokens"] = grow("tokens", torch.tensor([[pad_id]]))
    out["labels"] = grow("labels", torch.zeros(1, 1))
    out["loss_mask"] = grow("loss_mask", torch.zeros(1, 1))
    out["position_ids"] = grow("position_ids", batch["position_ids"][:, -1:])
    if batch.get("segment_ids") is not None:
        out["segment_ids"] = grow("segment_ids", batch["segment_ids"][:, -1:] + 1)
    mask = batch.get("attention_mask")
    if mask is not None:  # [B, 1, S, S], True = masked: padding keys hidden, a padding query sees itself
        new = torch.ones(*mask.shape[:2], seq + extra, seq + extra, dtype=mask.dtype, device=mask.device)
        new[..., :seq, :seq] = mask
        idx = torch.arange(seq, seq + extra, device=mask.device)
        new[..., idx, idx] = False
        out["attention_mask"] = new
    if batch.get("cu_seqlens") is not None:  # the collator's flattened offsets, recomputed for the new length
        from nemo_neva.data.packing import cu_seqlens_from_segments

        out["cu_seqlens"] = cu_seqlens_from_segments(out["segment_ids"])
        out["max_seqlen"] = int(torch.diff(out["cu_seqlens"]).max())
    return out


def split_microbatches(batch: dict, micro_batch_size: int, pad: bool = False) -> list:
    """Split a per-data-parallel-rank batch into micro-batches (images follow their samples). `pad`: fill a
    last partial micro-batch with loss-free rows (`pad_to_microbatches`, evaluation) instead of refusing it."""
    if pad:
        batch = pad_to_microbatches(batch, micro_batch_size)
    n = batch["tokens"].shape[0]
    if n % micro_batch_size:
        raise ValueError(f"batch of {n} samples is not a multiple of micro_batch_size={micro_batch_size}")
    out = []
    images = batch.get("images")
    if images is not None and "num_images" not in batch:
        raise ValueError("a batch with images needs 'num_images' (images per sample)")
    image_offsets = torch.cumsum(batch["num_images"], 0) - batch["num_images"] if images is not None else None
    for start in range(0, n, micro_batch_size):
        sl = slice(start, start + micro_batch_size)
        mb = {k: v[sl] for k, v in batch.items()
              if k not in PER_IMAGE and torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n}
        mb["images"] = None
        if images is not None:
            first = int(image_offsets[start])
            count = int(batch["num_images"][sl].sum())
            for key in PER_IMAGE:
                if batch.get(key) is not None and count:
                    mb[key] = batch[key][first:first + count]
        out.append(mb)
    return out
