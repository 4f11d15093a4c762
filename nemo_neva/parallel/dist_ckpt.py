"""megatron-core distributed checkpoints (sharded, any TP/PP layout can load them), on GPU and CPU.

`save_sharded` / `load_sharded` wrap `megatron.core.dist_checkpointing.save` / `load`. On a machine
without CUDA the writer's `torch.cuda.synchronize()` / `torch.cuda.current_device()` calls are answered by
`nemo_neva.compat.cpu` (no-ops there when CUDA is present). All ranks of the world must call them.

A script that saves must be spawn-safe (`if __name__ == "__main__":`): the checkpoint writer starts a
spawn-context multiprocessing helper that re-imports `__main__`.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from nemo_neva.compat.cpu import cuda_free
from nemo_neva.parallel.init import ensure_distributed


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_sharded(sharded_state_dict: dict, ckpt_dir: str) -> None:
    """Write `sharded_state_dict` (e.g. `model.sharded_state_dict()`) as a dist checkpoint in `ckpt_dir`.

    `ckpt_dir` is created if missing; it must be empty (megatron-core refuses to mix checkpoints).
    """
    ensure_distributed()
    ckpt_dir = os.path.abspath(ckpt_dir)
    if dist.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        if os.listdir(ckpt_dir):
            raise FileExistsError(f"checkpoint directory {ckpt_dir} is not empty; save to a new or empty folder")
    _barrier()
    with cuda_free():
        dist_checkpointing.save(sharded_state_dict, ckpt_dir)
    _barrier()
    _write_common_file(ckpt_dir)
    _barrier()


def _write_common_file(ckpt_dir: str) -> None:
    """Also keep the common (non-tensor) state in `common.pt`, where megatron-core 0.16.1 reads it.

    megatron-core 0.19 stores it inside the torch_dist files instead (a `common_state` object; it still
    reads a `common.pt` first when there is one), and 0.16.1 fails on a checkpoint without the file. The dict
    is read back with megatron-core's own reader, so both versions load the same common state.
    """
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    path = os.path.join(ckpt_dir, COMMON_STATE_FNAME)
    if dist.get_rank() != 0 or os.path.exists(path):
        return
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    with cuda_free():
        common = load_common_state_dict(ckpt_dir)
    torch.save(common, path)


def load_sharded(sharded_state_dict: dict, ckpt_dir: str) -> dict:
    """Load a dist checkpoint into the layout described by `sharded_state_dict` (resharding as needed).

    Returns a plain state dict of this rank's tensors (same keys as `sharded_state_dict`), ready for
    `module.load_state_dict(...)`.
    """
    ensure_distributed()
    ckpt_dir = os.path.abspath(ckpt_dir)
    if not os.path.isdir(ckpt_dir) or not os.path.exists(os.path.join(ckpt_dir, "metadata.json")):
        raise FileNotFoundError(f"{ckpt_dir} is not a megatron-core distributed checkpoint (no metadata.json)")
    with cuda_free():
        return dist_checkpointing.load(sharded_state_dict, ckpt_dir)
