"""The data position of a resumed run: samples consumed so far -> where each loader continues.

Training consumes exactly `global_batch_size` rows per optimizer step (loaders drop the last partial
batch), so the position is one number, `consumed_samples = global_step * global_batch_size`, and it is
turned back into (epoch, offset) with the loader's epoch length: the map-style loader's sampler
(ResumableDistributedSampler) and the tar-shard dataset (ShardedNevaDataset) both continue from there.
"""
from __future__ import annotations

import logging
import warnings
from typing import Optional

from torch.utils.data import DistributedSampler

log = logging.getLogger(__name__)


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that keeps its own epoch and can start an epoch part-way.

    The epoch advances when a pass is exhausted, not when Lightning calls `set_epoch` (ignored): after a
    resume Lightning's epoch counter and the data position need not agree (a checkpoint written at the end
    of training already counts the next epoch, and a resumed epoch may be entered and left at once).
    `resume_at(epoch, skip)`: passes of that epoch leave out this rank's first `skip` indices until one
    pass has been exhausted.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        pass

    def resume_at(self, epoch: int, skip: int) -> None:
        self.epoch, self._skip = int(epoch), int(skip)

    def __iter__(self):
        indices = list(super().__iter__())[self._skip:]

        def one_pass():
            yield from indices
            self.epoch, self._skip = self.epoch + 1, 0

        return one_pass()


def consumed_samples(global_step: int, global_batch_size: int) -> int:
    return int(global_step) * int(global_batch_size)


def fast_forward(loader, consumed: int, global_batch_size: int, dp_size: int) -> tuple[int, int]:
    """Position `loader` (the model's training loader) after `consumed` samples of the run.

    Returns (epoch, samples of that epoch already consumed by all ranks)."""
    from nemo_neva.data.shards import ShardedNevaDataset

    ds = loader.dataset
    if isinstance(ds, ShardedNevaDataset):
        epoch_len = ds._epoch_len()
        epoch, offset = divmod(consumed, epoch_len)
        ds.load_state_dict({"epoch": epoch, "consumed": offset, "seed": ds.seed, "total": ds.total})
        return epoch, offset
    sampler = loader.sampler
    if not isinstance(sampler, ResumableDistributedSampler):
        raise TypeError(f"cannot fast-forward a loader with a {type(sampler).__name__}")
    epoch_len = len(loader) * global_batch_size
    if epoch_len == 0:
        raise ValueError("the training data has fewer samples than one global batch")
    epoch, offset = divmod(consumed, epoch_len)
    if offset % dp_size:
        raise ValueError(f"consumed samples {consumed} do not split over {dp_size} data-parallel ranks")
    sampler.resume_at(epoch, offset // dp_size)
    return epoch, offset


def data_state(global_step: int, global_batch_size: int) -> dict:
    return {"consumed_samples": consumed_samples(global_step, global_batch_size),
            "global_batch_size": int(global_batch_size)}


def restore_data_position(loader, state: Optional[dict], global_batch_size: int, dp_size: int) -> None:
    # Lightning cannot see that our loaders resume mid-epoch; its warning would say the opposite.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    if not state:
        log.warning("checkpoint has no data position; the loader starts from the beginning")
        return
    if int(state["global_batch_size"]) != int(global_batch_size):
        log.warning("global_batch_size changed from %s to %s on resume; continuing after %s samples",
                    state["global_batch_size"], global_batch_size, state["consumed_samples"])
    epoch, offset = fast_forward(loader, int(state["consumed_samples"]), global_batch_size, dp_size)
    log.info("data: resuming at epoch %d after %d of its samples", epoch, offset)


__all__ = ["ResumableDistributedSampler", "fast_forward", "data_state", "restore_data_position"]
