"""megatron-core DDP (optionally with the distributed optimizer) and `get_megatron_optimizer`."""
from __future__ import annotations

from typing import Any, Mapping, Tuple

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from nemo_neva.compat.cpu import cuda_free


def _get(cfg: Any, key: str, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


def _config_of(model):
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model.config


def build_megatron_ddp(model: torch.nn.Module, cfg: Any = None) -> DistributedDataParallel:
    """megatron-core DDP around `model` (keys as in `build_megatron_ddp_and_optimizer`), wired into the
    model config's `finalize_model_grads_func` / `no_sync_func` so the schedule reduces gradients.

    `calculate_per_token_loss` (default False) sets megatron-core's flag of that name on the model config:
    the forward step's loss function then returns (loss sum, loss tokens, logged), DDP sums gradients over
    data-parallel ranks and `finalize_model_grads` divides them by the tokens of the whole global batch."""
    tconfig = _config_of(model)
    distributed = bool(_get(cfg, "use_distributed_optimizer", False))
    if bool(_get(cfg, "calculate_per_token_loss", False)):
        if bool(_get(cfg, "average_in_collective", False)):
            raise ValueError("calculate_per_token_loss sums gradients over data-parallel ranks; it cannot "
                             "average_in_collective")
        tconfig.calculate_per_token_loss = True  # read by DDP's constructor and by the schedules
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=bool(_get(cfg, "grad_reduce_in_fp32", True)),
        overlap_grad_reduce=bool(_get(cfg, "overlap_grad_reduce", False)),
        overlap_param_gather=bool(_get(cfg, "overlap_param_gather", False)),
        use_distributed_optimizer=distributed,
        bucket_size=_get(cfg, "bucket_size", None),
        average_in_collective=bool(_get(cfg, "average_in_collective", False)),
        check_for_nan_in_grad=bool(_get(cfg, "check_for_nan_in_grad", False)),
    )
    with cuda_free():
        ddp = DistributedDataParallel(tconfig, ddp_config, model)
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.no_sync_func = ddp.no_sync
    if ddp_config.overlap_grad_reduce:
        tconfig.grad_sync_func = ddp.start_grad_sync
    if ddp_config.overlap_param_gather:
        tconfig.param_sync_func = ddp.start_param_sync
    return ddp


def build_megatron_ddp_and_optimizer(model: torch.nn.Module, cfg: Any) -> Tuple[DistributedDataParallel, Any]:
    """Wrap `model` (a MegatronModule, e.g. GPTModel) in megatron-core DDP and build its optimizer.

    `cfg` (dict / DictConfig / object) keys, all optional: optimizer ("adam" | "sgd"), lr (1e-4), min_lr,
    weight_decay (0.0), betas ([0.9, 0.999]) or adam_beta1/adam_beta2, eps (1e-8), sgd_momentum (0.9),
    clip_grad (1.0; 0 disables), use_distributed_optimizer (False), grad_reduce_in_fp32 (True),
    overlap_grad_reduce (False), overlap_param_gather (False), bucket_size (None), average_in_collective
    (False), check_for_nan_in_grad (False), calculate_per_token_loss (False; see `build_megatron_ddp`).

    Also sets `config.finalize_model_grads_func` (DP/SP/embedding grad reduction at the end of a schedule)
    and `config.no_sync_func` on the model's TransformerConfig, so `run_forward_backward` reduces
    gradients exactly once per step. Returns `(ddp_model, megatron_optimizer)`. Each step:
    `ddp.zero_grad_buffer(); optimizer.zero_grad(); run_forward_backward(...);`
    `ok, grad_norm, _ = step_optimizer(optimizer)`.
    """
    tconfig = _config_of(model)
    distributed = bool(_get(cfg, "use_distributed_optimizer", False))
    ddp = build_megatron_ddp(model, cfg)

    betas = _get(cfg, "betas", None)
    beta1, beta2 = (betas[0], betas[1]) if betas is not None else (
        _get(cfg, "adam_beta1", 0.9), _get(cfg, "adam_beta2", 0.999))
    kind = str(_get(cfg, "optimizer", "adam")).lower()
    if kind == "adamw":  # megatron-core's "adam" is AdamW (decoupled weight decay)
        kind = "adam"
    if kind not in ("adam", "sgd"):
        raise ValueError(f"optimizer={kind!r}; megatron-core supports 'adam' (AdamW) and 'sgd'")
    lr = float(_get(cfg, "lr", 1e-4))
    opt_config = OptimizerConfig(
        optimizer=kind,
        lr=lr,
        min_lr=float(_get(cfg, "min_lr", 0.0)),
        weight_decay=float(_get(cfg, "weight_decay", 0.0)),
        adam_beta1=float(beta1),
        adam_beta2=float(beta2),
        adam_eps=float(_get(cfg, "eps", 1e-8)),
        sgd_momentum=float(_get(cfg, "sgd_momentum", 0.9)),
        clip_grad=float(_get(cfg, "clip_grad", 1.0)),
        use_distributed_optimizer=distributed,
        bf16=bool(tconfig.bf16),
        fp16=bool(tconfig.fp16),
        params_dtype=tconfig.params_dtype,
    )
    with cuda_free():
        optimizer = get_megatron_optimizer(opt_config, [ddp])
    return ddp, optimizer


def step_optimizer(optimizer):
    """`optimizer.step()` under the CPU compat context: returns (update_successful, grad_norm, num_zeros)."""
    with cuda_free():
        return optimizer.step()
