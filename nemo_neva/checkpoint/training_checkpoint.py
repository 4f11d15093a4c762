"""Resumable training checkpoints: megatron-core distributed checkpoints behind Lightning's checkpoint calls.

Lightning (and NeMo's exp_manager `ModelCheckpoint`) decide *when* to save and *which* checkpoint to resume
from; this module decides *what* a checkpoint is. `X.ckpt` becomes a folder `X/` holding

    dist/               megatron-core dist checkpoint: model weights + optimizer state (the distributed
                        optimizer's shards included), written by every rank, loadable into another layout
    trainer_state.pt    rank 0: step counters / loop progress, callbacks, LR scheduler, data position
    rng/rank{N}.pt      per-rank RNG states (Python, NumPy, torch, megatron-core's tracker)

A save goes to `X.partial/` first and becomes `X/` with one rename once every rank has finished, so a crash
while saving leaves the previous checkpoint untouched (Lightning removes the previous one only after the
new one exists). `tidy_checkpoint_dir` clears what an interrupted save can leave behind before a resume.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DIST_DIR = "dist"
TRAINER_STATE = "trainer_state.pt"
RNG_DIR = "rng"
PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".old"
# weights live in dist/; the config (and its class) comes from the run: the rest loads with weights_only=True
_DROPPED_KEYS = ("state_dict", "hyper_parameters", "hparams_name", "hparams_type")


def checkpoint_dir(filepath) -> str:
    """Lightning's `X.ckpt` -> the folder `X` (the layout NeMo's exp_manager resumes from)."""
    path = str(filepath)
    return path[: -len(".ckpt")] if path.endswith(".ckpt") else path


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    from megatron.core.tensor_parallel import random as mp_random

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "tracker": mp_random.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import random as mp_random

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    mp_random.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------ layout
def _publish(tmp: str, final: str) -> None:
    """Rank 0: make the finished `tmp` folder the checkpoint `final` (renames only)."""
    old = final + OLD_SUFFIX
    if os.path.exists(final):  # same name saved again: keep the old one until the new one is in place
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if os.path.exists(old):
        shutil.rmtree(old)


def _step_of(path: str) -> int:
    try:
        return int(torch.load(os.path.join(path, TRAINER_STATE), map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # unreadable: the least preferred
        return -1


def is_complete(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, TRAINER_STATE))
            and os.path.isfile(os.path.join(path, DIST_DIR, "metadata.json")))


def tidy_checkpoint_dir(ckpt_root: str) -> list[str]:
    """Clear what an interrupted save leaves in `ckpt_root` so that exactly one finished `*last` checkpoint
    remains to resume from (call on one rank, before exp_manager looks for checkpoints). Returns what
    was removed or restored."""
    if not os.path.isdir(ckpt_root):
        return []
    actions = []
    for name in sorted(os.listdir(ckpt_root)):
        path = os.path.join(ckpt_root, name)
        if name.endswith(PARTIAL_SUFFIX):  # a save that never finished
            shutil.rmtree(path, ignore_errors=True)
            actions.append(f"removed unfinished {name}")
        elif name.endswith(OLD_SUFFIX):  # a re-save interrupted between its two renames
            final = path[: -len(OLD_SUFFIX)]
            if os.path.exists(final):
                shutil.rmtree(path, ignore_errors=True)
                actions.append(f"removed superseded {name}")
            else:
                os.replace(path, final)
                actions.append(f"restored {name}")
    # A crash between "new last saved" and "old last removed" leaves two finished *last folders; NeMo's
    # exp_manager refuses to choose, so keep the newest.
    lasts = [os.path.join(ckpt_root, n) for n in os.listdir(ckpt_root)
             if n.endswith("last") and os.path.isdir(os.path.join(ckpt_root, n))]
    lasts = [p for p in lasts if is_complete(p)]
    for stale in sorted(lasts, key=_step_of)[:-1]:
        shutil.rmtree(stale, ignore_errors=True)
        actions.append(f"removed older {os.path.basename(stale)}")
    for a in actions:
        log.warning("checkpoint folder %s: %s", ckpt_root, a)
    return actions


def exp_checkpoint_root(exp_cfg) -> Optional[str]:
    """Where exp_manager keeps checkpoints when it resumes (no version folder in that mode)."""
    params = exp_cfg.get("checkpoint_callback_params") or {}
    if params.get("dirpath"):
        return str(params["dirpath"])
    if exp_cfg.get("explicit_log_dir"):
        return os.path.join(str(exp_cfg.explicit_log_dir), "checkpoints")
    exp_dir = exp_cfg.get("exp_dir") or os.path.join(os.getcwd(), "nemo_experiments")
    return os.path.join(str(exp_dir), str(exp_cfg.get("name") or "default"), "checkpoints")


def exp_manager_with_resume(trainer, exp_cfg):
    """NeMo's exp_manager, after tidying the checkpoint folder it will resume from (rank 0, then all ranks
    wait), so an interrupted save never stops a relaunch."""
    from nemo.utils.exp_manager import exp_manager

    from nemo_neva.parallel.init import ensure_distributed

    if exp_cfg.get("resume_if_exists"):
        ensure_distributed()
        if _rank() == 0:
            tidy_checkpoint_dir(exp_checkpoint_root(exp_cfg))
        _barrier()
    return exp_manager(trainer, exp_cfg)


def _distributed_optimizers(megatron_optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chain = getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer])
    return [opt for opt in chain if isinstance(opt, DistributedOptimizer)]


def optimizer_sharded_state(megatron_optimizer, model_sharded_state: dict, is_loading: bool) -> dict:
    """The megatron-core optimizer's sharded state dict (for `checkpoint_sharded_state`)."""
    from nemo_neva.compat.cpu import cuda_free

    with cuda_free():
        if is_loading:  # the distributed optimizer describes its state only once it has one (as on resume)
            for opt in _distributed_optimizers(megatron_optimizer):
                if not opt.optimizer.state:
                    opt._init_optimizer_states_with_dummy_values()
        # Distributed optimizer: megatron-core 0.16.1 no longer writes its default (flattened) format, and
        # its fully_reshardable loader drops torch Adam's per-parameter "step" (KeyError without
        # Apex/TE); dp_reshardable round-trips (same TP/PP layout on resume).
        return megatron_optimizer.sharded_state_dict(
            model_sharded_state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"})


def _restore_adam_steps(megatron_optimizer) -> None:
    """Put the checkpoint's Adam step count back into every parameter's state (distributed optimizer,
    torch Adam, i.e. no Apex/TE).

    megatron-core 0.16.1 saves that count once per param group. Its load_state_dict sets it into the
    parameters' states, but load_parameter_state_from_dp_reshardable then copies every per-parameter
    entry of the loaded dict over them, "step" included, and the dict's "step" is a non-persistent
    reference to the live step of the optimizer that was loading (1, from the dummy state it was given
    to be described): Adam's bias correction would restart and the run would diverge from the first
    resumed update. torch Adam also increments the tensor in place, so each parameter gets its own."""
    for opt in _distributed_optimizers(megatron_optimizer):
        inner = opt.optimizer
        for group in inner.param_groups:
            if group.get("step") is None:
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                if state and torch.is_tensor(state.get("step")):
                    old = state["step"]
                    state["step"] = torch.tensor(float(group["step"]), dtype=old.dtype, device=old.device)


def load_optimizer_state(megatron_optimizer, state: dict) -> None:
    """Load a state dict from `optimizer_sharded_state(..., is_loading=True)` (read back from dist/)."""
    from nemo_neva.compat.cpu import cuda_free

    # cuda_free: the distributed optimizer places its shards with CUDA calls; no_grad: it copies into
    # views of the (fp32) parameters in place
    with cuda_free(), torch.no_grad():
        megatron_optimizer.load_state_dict(state)
        _restore_adam_steps(megatron_optimizer)


# ------------------------------------------------------------------------------------------ strategy
class DistCheckpointMixin:
    """Strategy methods that turn Lightning's checkpoint dict into the folder described above.

    The LightningModule provides `checkpoint_sharded_state(is_loading)` -> {"model": ..., "optimizer": ...}
    (megatron-core sharded state dicts) and `load_checkpoint_weights(state)`; its optimizer is
    `MegatronOptimizerAdapter`. Restoring waits until the optimizer exists (`restore_checkpoint_after_setup`),
    because its sharded state dict is built from it.
    """

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    def lightning_module_state_dict(self) -> dict:
        return {}  # the weights go to dist/ in save_checkpoint

    def optimizer_state(self, optimizer) -> dict:
        return {"scheduler": optimizer.scheduler.state_dict()}  # the optimizer state goes to dist/

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Optional[Any] = None) -> None:
        from nemo_neva.parallel.dist_ckpt import save_sharded

        final = os.path.abspath(checkpoint_dir(filepath))
        tmp = final + PARTIAL_SUFFIX
        if _rank() == 0:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(os.path.join(tmp, RNG_DIR))
        _barrier()
        save_sharded(self.lightning_module.checkpoint_sharded_state(is_loading=False), os.path.join(tmp, DIST_DIR))
        torch.save(rng_state(), os.path.join(tmp, RNG_DIR, f"rank{_rank()}.pt"))
        if _rank() == 0:
            torch.save({k: v for k, v in checkpoint.items() if k not in _DROPPED_KEYS},
                       os.path.join(tmp, TRAINER_STATE))
        _barrier()
        if _rank() == 0:
            _publish(tmp, final)
        _barrier()

    def load_checkpoint(self, checkpoint_path) -> dict:
        from nemo_neva.checkpoint.untrusted import check_dist_checkpoint
        from nemo_neva.parallel.dist_ckpt import load_sharded

        folder = checkpoint_dir(checkpoint_path)
        if not is_complete(folder):
            raise FileNotFoundError(f"{folder} is not a complete nemo_neva training checkpoint")
        # Same checks as a .nemo's weights (megatron-core / torch DCP unpickle parts of dist/); the rest is
        # read with weights_only=True.
        check_dist_checkpoint(os.path.join(folder, DIST_DIR))
        state = torch.load(os.path.join(folder, TRAINER_STATE), map_location="cpu", weights_only=True)
        loaded = load_sharded(self.lightning_module.checkpoint_sharded_state(is_loading=True),
                              os.path.join(folder, DIST_DIR))
        state["state_dict"] = loaded["model"]
        for opt_state in state["optimizer_states"]:
            opt_state["optimizer"] = loaded["optimizer"]
        rng_file = os.path.join(folder, RNG_DIR, f"rank{_rank()}.pt")
        if os.path.isfile(rng_file):
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
        else:  # e.g. resumed with more ranks than saved it
            log.warning("no RNG state for rank %d in %s; keeping the seeded state", _rank(), folder)
        log.info("resuming from %s (step %s)", folder, state.get("global_step"))
        return state

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        self.lightning_module.load_checkpoint_weights(checkpoint["state_dict"])

    def load_optimizer_state_dict(self, checkpoint) -> None:
        for optimizer, opt_state in zip(self.optimizers, checkpoint["optimizer_states"]):
            load_optimizer_state(optimizer.megatron_optimizer, opt_state["optimizer"])
            optimizer.scheduler.load_state_dict(opt_state["scheduler"])

    def remove_checkpoint(self, filepath) -> None:
        if _rank() == 0:
            folder = checkpoint_dir(filepath)
            if os.path.isdir(folder):
                shutil.rmtree(folder)
            elif os.path.isfile(str(filepath)):
                os.remove(str(filepath))
