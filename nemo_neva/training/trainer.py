"""Shared plumbing of the training examples: trainer, experiment folder, final .nemo."""
from __future__ import annotations

import logging
import os

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from omegaconf import DictConfig, OmegaConf

from nemo_neva.checkpoint.training_checkpoint import DistCheckpointMixin
from nemo_neva.training.megatron_step import num_microbatches

log = logging.getLogger(__name__)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def data_parallel_size(model_cfg) -> int:
    mp = model_cfg.get("tensor_model_parallel_size", 1) * model_cfg.get("pipeline_model_parallel_size", 1)
    world = _world_size()
    if world % mp:
        raise ValueError(
            f"world size {world} is not divisible by tensor_model_parallel_size x pipeline_model_parallel_size "
            f"= {mp}; launch a multiple of {mp} processes"
        )
    return world // mp


class NevaDDPLaunchStrategy(DistCheckpointMixin, DDPStrategy):
    """Lightning's DDP launch and rank bookkeeping, without torch DDP wrapping.

    Gradient sync belongs to megatron-core's DDP (set up by the model in `configure_optimizers`), which
    reduces over the data-parallel group only; torch DDP would also average across tensor/pipeline ranks.
    Checkpoints are megatron-core distributed checkpoints written by all ranks (nemo_neva.checkpoint.training_checkpoint).
    """

    def configure_ddp(self) -> None:
        pass


class NevaSingleDeviceStrategy(DistCheckpointMixin, SingleDeviceStrategy):
    """One process: the same checkpoint format as NevaDDPLaunchStrategy, so a run resumes in either."""


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg.get("gradient_clip_val") or trainer_cfg.get("accumulate_grad_batches", 1) != 1:
        raise ValueError(
            "set model.optim.clip_grad and model.global_batch_size instead of trainer.gradient_clip_val / "
            "trainer.accumulate_grad_batches: megatron-core clips and accumulates"
        )
    # Batch sizes against the launch, before any model is built.
    num_microbatches(cfg.model.global_batch_size, cfg.model.micro_batch_size, data_parallel_size(cfg.model))
    import torch

    if trainer_cfg.get("accelerator") == "auto":
        trainer_cfg["accelerator"] = "gpu" if torch.cuda.is_available() else "cpu"
    world = _world_size()
    devices = trainer_cfg.get("devices", 1)
    if world > 1 or (isinstance(devices, int) and devices > 1):
        if world != devices * trainer_cfg.get("num_nodes", 1):
            raise ValueError(
                f"trainer.devices={devices} x trainer.num_nodes={trainer_cfg.get('num_nodes', 1)} does not match "
                f"the {world} launched process(es); launch with torchrun --nproc_per_node={devices}"
            )
        trainer_cfg["strategy"] = NevaDDPLaunchStrategy(
            process_group_backend="nccl" if torch.cuda.is_available() else "gloo"
        )
    else:
        accel = trainer_cfg.get("accelerator")
        trainer_cfg["strategy"] = NevaSingleDeviceStrategy(
            device=torch.device("cuda", 0) if accel in ("gpu", "cuda") else torch.device("cpu"))
    # The model's loaders shard by data-parallel rank (not by global rank, which would split TP groups).
    trainer_cfg["use_distributed_sampler"] = False
    return pl.Trainer(**trainer_cfg)


def nemo_output_path(cfg: DictConfig) -> str:
    """Relative `nemo_path` lands in <exp_dir>/<name>/ (stable across runs, unlike the timestamped folder)."""
    path = cfg.nemo_path
    if os.path.isabs(path):
        return path
    return os.path.join(cfg.exp_manager.exp_dir or "nemo_experiments", cfg.exp_manager.name or cfg.name, path)
