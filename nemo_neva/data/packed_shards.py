"""Sequence packing over streamed tar shards (`model.data.packed_sequence` with a sharded data_path).

The epoch's global sample sequence of ShardedNevaDataset (same seed/epoch order) is cut into windows of
`window` consecutive samples. For each window, every data-parallel rank reads the samples' JSON (not
their images; with tiling their image members too, for the placeholder counts), tokenizes them, and packs
the lengths with first-fit-decreasing -- the same bins on every rank, because the inputs are the same. Row r of the window goes to rank r % dp, and the window is
topped up with empty rows to a multiple of dp, so every rank gets the same number of rows per window
and hence of batches per epoch (unequal counts would hang data-parallel collectives). A rank then reads
and decodes the images of its own rows only. Windows go round-robin to DataLoader workers.

Position: a window counts as consumed once its last row for this rank has been handed out (the rows
carry the marker to the main process); `consumed` is the contiguous prefix of finished windows, so a
restart replays the windows that were in flight (some samples twice, none lost). Unlike the unpacked
stream, the order of rows in the batches depends on the number of workers.

Training resume (checkpoint["neva_data"]["packed"], see nemo_neva/checkpoint/data_position.py): the trainer
fetches a batch ahead of the one it trains, so the loader's own position can include windows finished only
by a batch that was never trained. PackedShardLoader therefore queues the position after each batch it
hands out and the model calls `mark_trained()` once per trained batch; `trained_state()` (a
ShardedNevaDataset.state_dict()) is the position after the last trained batch, or the next epoch's start
once the pass's last batch is trained. Rank 0's position is valid on every rank: each window gives every
rank the same number of rows, and windows go to workers by window index and the same start window on every
rank, so each rank's k-th batch finishes the same windows (with or without workers; each worker's partial
last batch is dropped on all ranks alike). A resumed run continues at the first unfinished window of the
saved epoch: at-least-once (windows in flight at the checkpoint are trained again), not bit-identical to
an uninterrupted run. A changed pack_window, dp size or worker count on resume still loses nothing (the
position is a sample count of the global sequence, replayed from the window it falls into).
"""
from __future__ import annotations

import os
from collections import deque
from typing import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nemo_neva.data.dataset import SAMPLE_ERRORS
from nemo_neva.data.packing import first_fit_decreasing
from nemo_neva.data.shard_encoding import parse_record
from nemo_neva.data.shards import ShardedNevaDataset, iter_shard


class PackedRow(list):
    """The items of one packed row; `window_done` = the window index when this is the window's last row
    for this rank (PackedCollator reports it in `batch["windows_done"]`)."""

    window_done: int | None = None


def _read(shards, wanted: dict[int, set], only: set | None) -> dict[tuple[int, int], dict]:
    """{(shard, file index): fields} for the wanted samples of each shard."""
    out = {}
    for s, indices in wanted.items():
        reader, found = iter_shard(shards[s][0], indices, only), 0
        try:
            for fi, fields in reader:
                if fields is not None:
                    out[(s, fi)] = fields
                    found += 1
                    if found == len(indices):
                        break
        finally:
            reader.close()
        missing = [i for i in indices if (s, i) not in out]
        if missing:
            raise ValueError(f"{shards[s][0]}: fewer samples than its index lists (missing {missing[:3]})")
    return out


class PackedShardDataset(IterableDataset):
    """Yields PackedRow lists of NevaDataset items (None for a sample whose image fails) for this rank.
    Iterate it through PackedShardLoader, which keeps the position and moves to the next epoch."""

    def __init__(self, sharded: ShardedNevaDataset, seq_length: int, window: int = 1000):
        if window < 1:
            raise ValueError("model.data.pack_window must be >= 1")
        self.sharded, self.seq_length, self.window = sharded, seq_length, window
        sharded.drop_remainder = False  # rows, not samples, are what ranks must agree on; see the module doc

    def _epoch_sequence(self) -> list[tuple[int, int]]:
        return [(s, fi) for s, perm in self.sharded.epoch_order() for fi in perm]

    def start_window(self) -> int:
        return self.sharded.consumed // self.window  # a mid-window position replays that window

    def __iter__(self) -> Iterator[PackedRow]:
        enc = self.sharded.encoder
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        seq = self._epoch_sequence()
        first = self.start_window()
        n_windows = -(-len(seq) // self.window)
        for w in range(first, n_windows):
            if (w - first) % workers != worker:
                continue
            positions = range(w * self.window, min((w + 1) * self.window, len(seq)))
            yield from self._window_rows(w, [seq[p] for p in positions], list(positions), enc)

    def _window_rows(self, w: int, samples, positions, enc) -> Iterator[PackedRow]:
        ds = self.sharded
        wanted: dict[int, set] = {}
        for s, fi in samples:
            wanted.setdefault(s, set()).add(fi)
        # the lengths need the text only; a tiled image's placeholder count also needs its header
        texts = _read(ds.shards, wanted, only=None if enc.tiling is not None else {"json"})
        lengths, kept = [], []
        for (s, fi), pos in zip(samples, positions):
            fallback, rec = f"{os.path.basename(ds.shards[s][0])}:{fi}", None
            try:
                rec = parse_record(texts[(s, fi)], fallback)
                ids = enc.encode_fields(rec, texts[(s, fi)])[0]
            except SAMPLE_ERRORS as e:
                if enc.strict or pos % ds.dp_size == ds.dp_rank:  # each bad sample counted by one rank
                    enc._skip(str(rec.get("id", fallback)) if isinstance(rec, dict) else fallback, e)
                continue
            lengths.append(max(len(ids) - 1, 0))
            kept.append((s, fi))
        bins = first_fit_decreasing(lengths, self.seq_length)
        bins += [[]] * (-len(bins) % ds.dp_size)  # every rank the same number of rows
        mine = bins[ds.dp_rank::ds.dp_size]
        need: dict[int, set] = {}
        for b in mine:
            for k in b:
                need.setdefault(kept[k][0], set()).add(kept[k][1])
        fields = _read(ds.shards, need, only=None) if need else {}
        for r, b in enumerate(mine):
            row = PackedRow(enc.item(fields[kept[k]], f"{os.path.basename(ds.shards[kept[k][0]][0])}:{kept[k][1]}")
                            for k in b)
            if r == len(mine) - 1:
                row.window_done = w
            yield row



class PackedShardLoader(DataLoader):
    """DataLoader over a PackedShardDataset that keeps the ShardedNevaDataset's position (windows whose
    rows were all handed out, as a contiguous prefix) and epoch up to date in this process."""

    def __init__(self, dataset: PackedShardDataset, batch_size: int = 1, **kwargs):
        if kwargs.get("num_workers", 0) > 0 and kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers would keep a stale epoch/position in the workers")
        super().__init__(dataset, batch_size=batch_size, **kwargs)
        self._handed: deque = deque()  # (epoch, consumed) after each batch handed out and not yet trained
        self._trained = self._state(dataset.sharded.epoch, dataset.sharded.consumed)

    def _state(self, epoch: int, consumed: int) -> dict:
        ds = self.dataset.sharded
        if consumed >= ds.epoch_len():  # an epoch handed out completely: the next one's start
            epoch, consumed = epoch + 1, 0
        return {"epoch": int(epoch), "consumed": int(consumed), "seed": ds.seed, "total": ds.total}

    def __iter__(self):
        packed = self.dataset
        ds = packed.sharded
        first = packed.start_window()
        done, prefix = set(), first
        self._handed.clear()  # batches of an abandoned pass were never trained
        for batch in super().__iter__():
            done.update(batch.get("windows_done", ()))
            while prefix in done:
                prefix += 1
            ds._start, ds._local = min(prefix * packed.window, ds.epoch_len()), 0
            self._handed.append((ds.epoch, ds._start))
            yield batch
        if self._handed:  # the pass's last batch, once trained, completes the epoch
            self._handed[-1] = (ds.epoch, ds.epoch_len())
        else:
            self._trained = self._state(ds.epoch, ds.epoch_len())
        ds._end_epoch()

    def mark_trained(self) -> None:
        """One batch of this loader was trained (the oldest handed-out one: batches are trained in order)."""
        if self._handed:
            self._trained = self._state(*self._handed.popleft())

    def trained_state(self) -> dict:
        """The position after the last trained batch, as ShardedNevaDataset.state_dict()."""
        return dict(self._trained)

    def load_trained_state(self, state: dict) -> None:
        """Continue at `state` (trained_state() of an earlier run): the first unfinished window of its epoch."""
        ds = self.dataset.sharded
        ds.load_state_dict(state)
        self._trained = self._state(ds.epoch, ds.consumed)
        ds.load_state_dict(self._trained)  # a finished epoch -> the next one's start
        self._handed.clear()
