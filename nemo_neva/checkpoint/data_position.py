"""The data position of a resumed run: samples consumed so far -> where each loader continues.

Training consumes exactly `global_batch_size` rows per optimizer step (loaders drop the last partial
batch), so the position is one number, `consumed_samples = global_step * global_batch_size`, and it is
turned back into (epoch, offset) with the loader's epoch length: the map-style loader's sampler
(ResumableDistributedSampler) and the tar-shard dataset (ShardedNevaDataset) both continue from there.

Packed tar shards are the exception: their rows are not samples, so the global step cannot place them.
Their checkpoints also store the packed stream's own position (`"packed"`: PackedShardLoader.trained_state(),
the windows finished by the trained batches), and a resume continues at the first unfinished window of that
epoch -- at-least-once (the windows in flight at the checkpoint are trained again), not bit-identical to an
uninterrupted run; see nemo_neva/data/packed_shards.py.

Energon datasets (nemo_neva/data/energon.py) keep a savable loader state per data-parallel rank: checkpoints
also store every DP rank's state as of its trained batches (`"energon"`, a list in DP-rank order), and a
relaunch restores its rank's entry, so it continues with exactly the batches of an uninterrupted run.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable, Optional

from torch.utils.data import DistributedSampler

log = logging.getLogger(__name__)


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler whose passes start where the run is, not where Lightning's epoch counter says.

    `consumed_fn()` -> samples the run has trained on so far (all ranks; the model passes
    `global_step * global_batch_size`). Each pass computes its epoch and how many of this rank's indices
    to leave out from that, so a resumed run continues after exactly what it trained on, also when a
    checkpoint was written at an epoch's last batch or at the end of training (where Lightning's restored
    epoch counter is ahead of the data). Without `consumed_fn` it is a plain DistributedSampler.
    """

    def __init__(self, *args, batch_size: int = 1, consumed_fn: Optional[Callable[[], int]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_size, self.consumed_fn = int(batch_size), consumed_fn

    def position(self, consumed: int) -> tuple[int, int]:
        """(epoch, samples of that epoch consumed by all ranks) after `consumed` samples of the run."""
        steps = self.num_samples // self.batch_size  # full batches per epoch (the loader drops the rest)
        epoch_len = steps * self.batch_size * self.num_replicas
        if epoch_len == 0:
            raise ValueError("the training data has fewer samples than one global batch")
        return divmod(int(consumed), epoch_len)

    def __iter__(self):
        if self.consumed_fn is None:
            return super().__iter__()
        epoch, offset = self.position(self.consumed_fn())
        self.epoch = epoch
        return iter(list(super().__iter__())[offset // self.num_replicas:])


# Packed rows are not samples: a checkpoint without the packed stream's own position cannot place them.
NO_PACKED_POSITION = ("this checkpoint has no packed-stream position (it was written before packed tar shards were "
                      "resumable), and its consumed_samples cannot place packed rows; start over "
                      "(exp_manager.resume_if_exists=false or a new exp_manager.exp_dir), or resume with "
                      "model.data.packed_sequence=false")


NO_ENERGON_POSITION = ("this checkpoint has no Energon data position (it was written by a run on other data, or "
                       "before Energon datasets were resumable), and its consumed_samples cannot place Energon's "
                       "stream; resume on the data it was written with, or start over "
                       "(exp_manager.resume_if_exists=false or a new exp_manager.exp_dir)")


def consumed_samples(global_step: int, global_batch_size: int) -> int:
    return int(global_step) * int(global_batch_size)


def fast_forward(loader, consumed: int) -> tuple[int, int]:
    """Position the model's training `loader` after `consumed` samples of the run; returns (epoch, samples
    of that epoch already consumed by all ranks)."""
    from nemo_neva.data.packed_shards import PackedShardDataset
    from nemo_neva.data.shards import ShardedNevaDataset

    ds = loader.dataset
    if isinstance(ds, PackedShardDataset):  # its rows are not samples: global_step cannot place it
        raise ValueError(NO_PACKED_POSITION)
    if isinstance(ds, ShardedNevaDataset):
        epoch, offset = divmod(consumed, ds.epoch_len())
        ds.load_state_dict({"epoch": epoch, "consumed": offset, "seed": ds.seed, "total": ds.total})
        return epoch, offset
    sampler = loader.sampler
    if not isinstance(sampler, ResumableDistributedSampler) or sampler.consumed_fn is None:
        raise TypeError(f"cannot fast-forward a loader with a {type(sampler).__name__}")
    return sampler.position(consumed)  # the sampler follows the run's global step by itself


def data_state(global_step: int, global_batch_size: int, loader=None) -> dict:
    state = {"consumed_samples": consumed_samples(global_step, global_batch_size),
             "global_batch_size": int(global_batch_size)}
    trained_state = getattr(loader, "trained_state", None)  # packed tar shards: their own position
    if callable(trained_state):
        state["packed"] = trained_state()
    if callable(getattr(loader, "energon_state", None)):  # Energon: every DP rank's savable state (collective)
        from nemo_neva.data.energon import gather_states

        state["energon"] = gather_states(loader, loader.source.dp_group)
    return state


def restore_data_position(loader, state: Optional[dict], global_batch_size: int) -> None:
    # Lightning cannot see that our loaders resume mid-epoch; its warning would say the opposite.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    if not state:
        log.warning("checkpoint has no data position; the loader starts from the beginning")
        return
    if callable(getattr(loader, "load_energon_state", None)):  # Energon: its own savable state per DP rank
        from nemo_neva.data.energon import restore_states

        if "energon" not in state:
            raise ValueError(NO_ENERGON_POSITION)
        restore_states(loader, state["energon"])
        log.info("data: resuming the Energon stream after %d trained batches of this rank",
                 state["energon"][loader.source.dp_rank]["trained_batches"])
        return
    if "energon" in state:
        raise ValueError("this checkpoint was written by a run on an Energon dataset; its data position cannot "
                         "place this data. Resume on the same Energon dataset, or start over")
    if callable(getattr(loader, "load_trained_state", None)):  # packed tar shards: any global batch size
        if "packed" not in state:
            raise ValueError(NO_PACKED_POSITION)
        loader.load_trained_state(state["packed"])
        pos = loader.trained_state()
        log.info("data: resuming the packed stream at epoch %d after %d of its samples (at the first unfinished "
                 "window of %d samples: windows in flight at the checkpoint are trained again)",
                 pos["epoch"], pos["consumed"], loader.dataset.window)
        return
    if int(state["global_batch_size"]) != int(global_batch_size):
        log.warning("global_batch_size changed from %s to %s on resume; continuing after %s samples",
                    state["global_batch_size"], global_batch_size, state["consumed_samples"])
    if "packed" in state:
        log.warning("this checkpoint was written by a packed-shard run: its consumed_samples (%s) counts packed "
                    "rows, not samples, so the unpacked data continues from a different place than it stopped",
                    state["consumed_samples"])
    epoch, offset = fast_forward(loader, int(state["consumed_samples"]))
    log.info("data: resuming at epoch %d after %d of its samples", epoch, offset)


__all__ = ["ResumableDistributedSampler", "fast_forward", "data_state", "restore_data_position"]
