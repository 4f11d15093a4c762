"""Sharded streaming data: LLaVA records + image and video bytes in webdataset-style tar shards.

Layout (written by scripts/convert_llava_to_shards.py): `shard-000000.tar`, ... each holding, per
sample, `<key>.json` (the LLaVA record, `id` filled in) and its image and video files' bytes (already
validated): `<key>.<ext>` for a sample's only image, `<key>.<i>.<ext>` (i = 0, 1, ... in tag order) for
several, videos likewise (`mp4`, `mkv`, `avi`; see shard_encoding.py); members of one sample adjacent.
`index.json` lists the shards with their sample counts, so the length of an epoch is known without reading
the shards. The shards are
plain tar files in webdataset's naming convention, so `webdataset.WebDataset` can read them too.

Reading uses `tarfile` rather than webdataset's pipeline because the order has to be exact, not just
random: ShardedNevaDataset defines one global sequence per (seed, epoch) -- shards in a shuffled
order, each shard's samples through a bounded shuffle buffer -- and deals position i of what is left
of it to data-parallel rank i % dp; on a rank, consecutive batches of `batch_size` go round-robin to
the DataLoader workers, which is the order the DataLoader collects them in. So a rank's output order
does not depend on the number of workers, every sample is seen once per epoch, and the position is a
single number (global samples consumed), which also survives a change of dp size on restart.
A worker walks the tar headers of a shard once (kept for the last few shards) and seeks to its own samples'
bytes, so shards should be on a seekable filesystem.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import tarfile
from collections import Counter, OrderedDict
from typing import Iterator, Mapping, Sequence, Union

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nemo_neva.data.processor import NevaProcessor
from nemo_neva.data.settings import DatasetSettings
from nemo_neva.data.shard_encoding import ShardRecordEncoder

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
FORMAT = "nemo_neva.shards/1"


# ---------------------------------------------------------------------------------------- locating
def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); `{x,y}` lists too."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end():], m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [p for opt in options for p in expand_braces(head + opt + tail)]


def is_shard_spec(path) -> bool:
    """Whether a data_path names shards: an index.json, a folder with one, or `.tar` file(s)/pattern."""
    if isinstance(path, (list, tuple)):
        return bool(path) and all(isinstance(p, str) and p.endswith(".tar") for p in path)
    if not isinstance(path, str):
        return False
    if path.endswith(".tar") and ("{" in path or os.path.isfile(path)):
        return True
    if os.path.basename(path) == INDEX_NAME:
        return True
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, INDEX_NAME))


def _count_samples(path: str) -> int:
    keys = set()
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if m.isfile():
                keys.add(_split_name(m.name)[0])
    return len(keys)


def resolve_shards(spec: Union[str, Sequence[str]]) -> list[tuple[str, int]]:
    """(shard path, sample count) per shard. Counts come from the folder's index.json where it lists
    the shard, otherwise from scanning the shard's tar headers."""
    if isinstance(spec, str) and (os.path.isdir(spec) or os.path.basename(spec) == INDEX_NAME):
        index_path = spec if spec.endswith(INDEX_NAME) else os.path.join(spec, INDEX_NAME)
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        folder = os.path.dirname(index_path)
        return [(os.path.join(folder, s["name"]), int(s["samples"])) for s in index["shards"]]
    paths = [p for s in ([spec] if isinstance(spec, str) else spec) for p in expand_braces(s)]
    if not paths:
        raise ValueError(f"no shards in {spec!r}")
    indexes: dict[str, dict] = {}
    out = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"shard not found: {p!r}")
        folder = os.path.dirname(p)
        if folder not in indexes:
            ip = os.path.join(folder, INDEX_NAME)
            indexes[folder] = {}
            if os.path.isfile(ip):
                with open(ip, encoding="utf-8") as f:
                    indexes[folder] = {s["name"]: int(s["samples"]) for s in json.load(f)["shards"]}
        n = indexes[folder].get(os.path.basename(p))
        out.append((p, n if n is not None else _count_samples(p)))
    return out


# ---------------------------------------------------------------------------------------- reading
def _split_name(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename, the rest is the field."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower()


_INDEX_CACHE: "OrderedDict[tuple, list]" = OrderedDict()
_INDEX_CACHE_SHARDS = 16  # per process; a blend reads from about one shard per source at a time


def _member_index(path: str) -> list[list[tarfile.TarInfo]]:
    """Each sample's tar members, in file order. The headers are walked once per process and kept for the
    last few shards, so reading scattered samples (blends, packed windows) does not rescan them."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)  # a rewritten shard is indexed again
    got = _INDEX_CACHE.get(key)
    if got is not None:
        _INDEX_CACHE.move_to_end(key)
        return got
    samples, key = [], None
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            k = _split_name(m.name)[0]
            if k != key:
                samples.append([])
                key = k
            samples[-1].append(m)
    _INDEX_CACHE[key] = samples
    while len(_INDEX_CACHE) > _INDEX_CACHE_SHARDS:
        _INDEX_CACHE.popitem(last=False)
    return samples


def iter_shard(path: str, wanted, only: set | None = None) -> Iterator[tuple[int, dict]]:
    """(sample index in file order, {field: bytes}) for the `wanted` samples, in file order; `only`: the
    fields to read. Ends early if the shard holds fewer samples than asked for (callers report it)."""
    index = _member_index(path)
    with open(path, "rb") as f:
        for idx in sorted(wanted):
            if idx >= len(index):
                return
            fields = {}
            for m in index[idx]:
                ext = _split_name(m.name)[1]
                if only is None or ext in only:
                    f.seek(m.offset_data)
                    fields[ext] = f.read(m.size)
            yield idx, fields


def buffer_shuffle_order(n: int, buffer: int, rng: random.Random) -> list[int]:
    """Output order of a shuffle buffer of `buffer` items fed 0..n-1 (the full permutation if
    buffer >= n); computed on indices, so a reader holds at most ~buffer samples it still has to emit."""
    buf, out = [], []
    for i in range(n):
        if len(buf) < max(buffer, 1):
            buf.append(i)
            continue
        j = rng.randrange(len(buf))
        out.append(buf[j])
        buf[j] = i
    rng.shuffle(buf)
    return out + buf


class ShardedNevaDataset(IterableDataset):
    """Streams NevaDataset items from tar shards; see the module docstring for the order. `processor` /
    `settings`: as NevaDataset's (data/settings.py); `settings.seed` and `shuffle_buffer` fix the order.

    `dp_rank`/`dp_size`: this rank's place among data-parallel ranks (megatron-core parallel_state).
    `batch_size`: the DataLoader's batch size (ShardedLoader sets it); batches are dealt to workers
    round-robin. `drop_remainder`: cut each epoch to a multiple of dp_size * batch_size, so every rank
    runs the same number of full batches (training); otherwise every sample is served (evaluation).
    A sample whose text, image or video fails NevaDataset's checks is served as None (the collators turn it
    into an empty row), so every rank still gets the same number of rows.

    Position: `state_dict()` -> {"epoch", "consumed", "seed", "total"}, `consumed` counting samples of
    the epoch's global sequence taken by all ranks together; `load_state_dict` continues from there.
    Consumption is counted where items reach the caller: by __iter__ when iterated in this process,
    by ShardedLoader when DataLoader workers produce them. An exhausted pass, or a new pass over an epoch
    already handed out completely, moves to the next epoch; `len()` is the whole epoch's (per rank).
    """

    def __init__(self, shards: Union[str, Sequence[str]], processor: NevaProcessor,
                 settings: DatasetSettings = DatasetSettings(), dp_rank: int = 0, dp_size: int = 1,
                 shuffle: bool = True, drop_remainder: bool = False, batch_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        self.shards = resolve_shards(shards)
        self.total = sum(n for _, n in self.shards)
        if self.total == 0:
            raise ValueError(f"no samples in shards {shards!r}")
        self.encoder = ShardRecordEncoder(processor, settings)
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, settings.seed
        self.shuffle, self.shuffle_buffer, self.drop_remainder = shuffle, settings.shuffle_buffer, drop_remainder
        self.batch_size = batch_size
        self.epoch, self._start, self._local = 0, 0, 0  # _local: this rank's samples taken since _start

    # ------------------------------------------------------------------ position
    def epoch_len(self) -> int:
        """Samples of one epoch's global sequence (with drop_remainder: whole global batches of it)."""
        if not self.drop_remainder:
            return self.total
        step = self.dp_size * self.batch_size
        return self.total - self.total % step

    @property
    def consumed(self) -> int:
        return min(self._start + self._local * self.dp_size, self.epoch_len())

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._start, self._local = int(epoch), 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "total": self.total}

    def load_state_dict(self, state: Mapping) -> None:
        if int(state.get("total", self.total)) != self.total or int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"data state {dict(state)} was saved for other shards or another seed "
                             f"(now total={self.total}, seed={self.seed})")
        consumed = int(state["consumed"])
        if not 0 <= consumed <= self.epoch_len():
            raise ValueError(f"consumed={consumed} outside the epoch (0..{self.epoch_len()})")
        self.epoch, self._start, self._local = int(state["epoch"]), consumed, 0

    def _advance(self, n: int) -> None:
        self._local += n

    def _end_epoch(self) -> None:
        self.set_epoch(self.epoch + 1)

    def _roll_over(self) -> None:
        """Start the next epoch if this one has been handed out completely. A trainer that stops at the
        loader's length never exhausts the pass, so the epoch cannot end only on exhaustion."""
        if self.epoch_len() == 0:  # an empty epoch would make a trainer loop without training
            raise ValueError(f"{self.total} samples are fewer than one global batch "
                             f"({self.dp_size} ranks x {self.batch_size})")
        if self.consumed >= self.epoch_len():
            self._end_epoch()

    def __len__(self) -> int:
        """Samples this rank gets in a whole epoch, whatever part of it is consumed: like
        DistributedSampler's length, a constant the trainer reads once; after a mid-epoch resume the
        pass yields only what is left, and the trainer's restored batch count makes up the rest."""
        left = self.epoch_len() - self.dp_rank
        return max(0, -(-left // self.dp_size))

    # ------------------------------------------------------------------ order
    def _rng(self, what: str, epoch=None) -> random.Random:
        epoch = self.epoch if epoch is None else epoch
        return random.Random(f"{self.seed}:{epoch}:{what}")  # str seeds are hashed stably

    def epoch_order(self, epoch=None) -> list[tuple[int, list[int]]]:
        """(shard number, file-order sample indices in output order) for the current epoch (or `epoch`,
        any value naming an order: a blend asks for its sources' passes)."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            self._rng("shards", epoch).shuffle(order)
        out = []
        for s in order:
            n = self.shards[s][1]
            name = os.path.basename(self.shards[s][0])
            perm = buffer_shuffle_order(n, self.shuffle_buffer, self._rng(name, epoch)) if self.shuffle \
                else list(range(n))
            out.append((s, perm))
        return out

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._roll_over()
        start, end, dp, bs = self.consumed, self.epoch_len(), self.dp_size, max(self.batch_size, 1)
        self._start, self._local = start, 0
        pos = 0  # global position of the next sample of the epoch's sequence
        for s, perm in self.epoch_order():  # runs of one shard (a whole shard here; shorter in a blend)
            path, n = self.shards[s][0], len(perm)
            mine = []
            for p in range(n):
                rel = pos + p - start
                if 0 <= rel < end - start and rel % dp == self.dp_rank and (rel // dp // bs) % workers == worker:
                    mine.append(perm[p])
            pos += n
            if not mine:
                continue
            loaded: dict[int, dict] = {}
            left = Counter(mine)  # a blend's run may draw the same sample twice
            reader = iter_shard(path, set(mine))
            for fi in mine:
                while fi not in loaded:
                    got = next(reader, None)
                    if got is None:
                        raise ValueError(f"{path}: fewer samples than its index lists (no sample {fi})")
                    loaded[got[0]] = got[1]
                left[fi] -= 1
                fields = loaded.pop(fi) if left[fi] == 0 else loaded[fi]
                item = self.encoder.item(fields, f"{os.path.basename(path)}:{fi}")
                if info is None:
                    self._local += 1
                yield item
            reader.close()
        if info is None:
            self._end_epoch()

    prescan_skips: Counter = Counter()  # shards are checked only while streaming

    @property
    def skip_counts(self) -> Counter:
        return self.encoder.skip_counts

    def take_new_skips(self) -> Counter:
        return self.encoder.take_new_skips()

    def summary(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.encoder.skip_counts.items())) or "none"
        return (f"{self.total} samples in {len(self.shards)} shards; epoch {self.epoch}, consumed "
                f"{self.consumed}; skipped in this process: {skipped}")


def _rows(batch) -> int:
    if isinstance(batch, Mapping) and "tokens" in batch:
        return int(batch["tokens"].shape[0])
    if isinstance(batch, (list, tuple)):
        return len(batch)
    raise TypeError(f"cannot count the samples in a {type(batch).__name__} batch")


class ShardedLoader(DataLoader):
    """DataLoader over a ShardedNevaDataset that keeps the dataset's position (samples handed out)
    and its epoch up to date in this process, with or without workers. Not for packed rows."""

    def __init__(self, dataset: ShardedNevaDataset, batch_size: int = 1, **kwargs):
        if kwargs.get("num_workers", 0) > 0 and kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers would keep a stale epoch/position in the workers")
        dataset.batch_size = batch_size
        super().__init__(dataset, batch_size=batch_size, **kwargs)

    def __iter__(self):
        ds, counting = self.dataset, self.num_workers > 0
        ds._roll_over()  # before the workers take their copies of the position
        if counting:
            ds._start, ds._local = ds.consumed, 0
        for batch in super().__iter__():
            if counting:
                ds._advance(_rows(batch))
            yield batch
        if counting:
            ds._end_epoch()
