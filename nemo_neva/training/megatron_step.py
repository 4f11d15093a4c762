"""Training through megatron-core: its DDP (optionally the distributed optimizer), optimizer, LR schedule
and forward-backward schedules (pipelined or not), driven from Lightning's manual optimization.

Lightning owns the loop, logging and checkpoint callbacks; megatron-core owns everything that depends on
the parallel layout. `MegatronOptimizerAdapter` lets Lightning count optimizer steps on a megatron optimizer.
"""
from __future__ import annotations

from typing import Iterable

import torch
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from nemo_neva.parallel.optimizer import build_megatron_ddp_and_optimizer, step_optimizer

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


def optimizer_settings(optim_cfg) -> dict:
    """`model.optim` (NeMo-style names) -> the keys of `nemo_neva.parallel.optimizer`."""
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
    """megatron-core DDP + optimizer (nemo_neva.parallel.optimizer) + LR schedule, as a Lightning optimizer."""
    settings = optimizer_settings(optim_cfg)
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


def reduce_logged_loss(losses: Iterable[dict]) -> torch.Tensor:
    """Mean micro-batch loss over the last pipeline stage's data-parallel ranks, shared with every stage
    (for logging; gradients are averaged by megatron-core's DDP)."""
    losses = list(losses)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        value = torch.stack([d["loss"] for d in losses]).float().mean() if losses else torch.zeros(())
    else:
        value = torch.zeros(())
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(value, group=parallel_state.get_data_parallel_group())
        value /= parallel_state.get_data_parallel_world_size()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(
            value, src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return value


def num_microbatches(global_batch_size: int, micro_batch_size: int, dp: int) -> int:
    """global_batch_size = micro_batch_size x data-parallel size x micro-batches per step."""
    per_step = micro_batch_size * dp
    if global_batch_size % per_step:
        raise ValueError(
            f"model.global_batch_size={global_batch_size} must be a multiple of "
            f"micro_batch_size x data-parallel size = {per_step}"
        )
    return global_batch_size // per_step


def masked_mean_loss(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean over trainable tokens; a batch with none gives a finite 0, never NaN."""
    mask = loss_mask.to(per_token.dtype)
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1)


def split_microbatches(batch: dict, micro_batch_size: int) -> list:
    """Split a per-data-parallel-rank batch into micro-batches (images follow their samples)."""
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
              if k != "images" and torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n}
        if images is not None:
            first = int(image_offsets[start])
            count = int(batch["num_images"][sl].sum())
            mb["images"] = images[first:first + count] if count else None
        else:
            mb["images"] = None
        out.append(mb)
    return out
