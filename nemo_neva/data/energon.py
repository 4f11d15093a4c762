"""Megatron-Energon datasets: `model.data.data_path=<energon dataset folder or metadataset.yaml>`.

An Energon dataset is webdataset shards prepared by `energon prepare` (a `.nv-meta/` folder beside them:
split, sample type, field map or sample loader, tar index); a metadataset YAML blends or splits several.
NeMo 2, Megatron-LM and Megatron-Bridge read multimodal data this way, and so does nemo_neva here.

Energon reads, shards over data-parallel ranks, shuffles, blends (metadataset weights) and keeps a savable
position; our task encoder (`NevaTaskEncoder`) turns its typed samples into nemo_neva's rows with the same
code as the JSON and tar-shard paths: a sample becomes a LLaVA record (`sample_to_record`), `NevaDataset.encode`
renders it with the configured conversation template and tokenises it (image placeholders, truncation,
label masks), the image goes through image_io's byte/pixel limits and the HF image processor, and
NevaCollator / PackedCollator build the batch.

  CaptioningSample (stage 1)  -> [human "<image>", gpt caption]
  VQASample (stage 2)         -> context str + answers list: one turn with the best answer;
                                 context list + answers list: a multi-turn conversation (NeMo 2's convention)
  any sample with a `conversations` list (a LLaVA record) -> used as is
  LlavaSample (energon_sample.py)  -> its LLaVA record with its images' and videos' bytes (video datasets)
  `image` a list (several images)  -> one per `<image>` tag of the user turns, in order (NevaDataset's rules)

Images and videos are handed to us undecoded (`NevaSampleDecoder` decodes text and JSON only), so the pixel and
frame limits (`model.data.video.*` for videos) are checked before a decoder allocates anything. With
`model.mm_cfg.image_tiling`, an image's placeholder count comes from its header (`Tiling.tokens`). A bad
sample is counted under its reason (as elsewhere: `batch["skips"]`, summed over ranks by skip_tally.py) and
skipped: Energon fills the batch with the next sample, so every row is real. `model.data.strict=true` makes it an error instead.

Ranks: one Energon loader per data-parallel rank (WorkerConfig rank / world size / group = the DP group);
tensor- and pipeline-parallel ranks of one DP rank build the same loader and so read the same batches.

Resume: `EnergonLoader` keeps Energon's savable state as of the batches *trained* (Lightning prefetches one
batch ahead, so the loader's own current state is one batch too far): a snapshot before each fetch, the
trained one selected by `mark_trained`. Checkpoints store every DP rank's state (gathered to all ranks of the
group, written by rank 0) in plain types (`to_plain`), loadable with `torch.load(weights_only=True)`; only
Energon's own state classes are rebuilt from it. A relaunch restores each rank's state and continues with
exactly the batches an uninterrupted run would have trained.
"""
from __future__ import annotations

import logging
import os
from collections import Counter, deque
from typing import Mapping, Optional

import torch

from nemo_neva.data.energon_encoding import (EnergonSampleEncoder, make_task_encoder, require_energon,
                                            sample_to_record)
from nemo_neva.data.energon_state import from_plain, to_plain
from nemo_neva.data.processor import NevaProcessor
from nemo_neva.data.settings import DatasetSettings

log = logging.getLogger(__name__)

META_DIR = ".nv-meta"
STATE_FORMAT = "nemo_neva.energon_state/1"


# ---------------------------------------------------------------------------------------- locating
def is_energon_path(path) -> bool:
    """An Energon dataset folder (it has `.nv-meta/`) or an Energon metadataset YAML file."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    path = str(path)
    if os.path.isdir(path):
        return os.path.isdir(os.path.join(path, META_DIR))
    if os.path.isfile(path) and path.endswith((".yaml", ".yml")):
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                doc = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            return False
        return isinstance(doc, dict) and str(doc.get("__module__", "")).startswith("megatron.energon") \
            and str(doc.get("__class__", "")).startswith("Metadataset")
    return False


# ---------------------------------------------------------------------------------------- loaders
class EnergonLoader:
    """Iterable over one DP rank's Energon batches, keeping the savable state of the *trained* batches.

    `mark_trained()` (called by the model after each optimizer step) advances the trained count;
    `energon_state()` -> this rank's state after the trained batches; `load_energon_state(state)` before
    iterating continues from there. `len()` is Energon's batches per rank and epoch (the stream itself repeats).

    Without workers the state is taken before each fetch (`save_state_rank`, ~2 ms). With workers that would be a
    round trip to every worker per batch (~50 ms measured), so after each fetch only the loader's per-worker
    sample counters are noted, and the state is asked from the workers for those counters when a checkpoint is
    written: what `save_state_rank` does, at an earlier position (the workers keep checkpoints to rebuild it).
    """

    def __init__(self, loader, source: "EnergonSource", savable: bool = True):
        self.loader, self.source, self.savable = loader, source, savable
        self.dataset = source
        self._workers = getattr(loader, "num_workers", 0) > 0
        self._snapshots: deque = deque()  # (batches yielded, "state", state) or (.., "counters", (counters, next))
        self._yielded = self._trained = 0

    def __len__(self) -> int:
        return len(self.loader)

    def _snapshot(self) -> None:
        """Note the position after the batches yielded so far (once per position)."""
        if not self.savable or (self._snapshots and self._snapshots[-1][0] == self._yielded):
            return
        if self._workers and getattr(self.loader, "_has_workers", False):
            counters = (list(self.loader._worker_sample_counters), int(self.loader._next_worker_id))
            self._snapshots.append((self._yielded, "counters", counters))
        else:  # no workers, or workers not started yet (Energon answers from its initial / restored state)
            self._snapshots.append((self._yielded, "state", self.loader.save_state_rank()))

    def __iter__(self):
        for batch in _snapshotting(self):
            yield batch

    def mark_trained(self) -> None:
        self._trained += 1
        while len(self._snapshots) > 1 and self._snapshots[1][0] <= self._trained:
            self._snapshots.popleft()
        if self._yielded == self._trained:  # nothing prefetched: the loader's position is the trained one
            self._snapshot()

    def _trained_snapshot(self):
        for n, kind, value in self._snapshots:
            if n != self._trained:
                continue
            if kind == "state":
                return value
            from megatron.energon.savable_loader import SavableDataLoaderState

            counters, next_worker = value
            return SavableDataLoaderState(worker_states=self.loader._worker_command("get_checkpoint", counters),
                                          next_worker_id=next_worker, micro_batch_size=self.loader._get_batch_size())
        raise RuntimeError(f"no Energon state for {self._trained} trained batches "
                           f"(have {[n for n, _, _ in self._snapshots]})")

    def energon_state(self) -> dict:
        """This rank's position, in plain types (see module docstring)."""
        return {"format": STATE_FORMAT, "trained_batches": self._trained, "config": self.source.fingerprint,
                "state": to_plain(self._trained_snapshot())}

    def load_energon_state(self, state: Mapping) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown Energon data position format {state.get('format')!r}")
        if state.get("config") != self.source.fingerprint:
            raise ValueError(f"this checkpoint's Energon data position was saved for {state.get('config')}, "
                             f"but the data is now {self.source.fingerprint}; resume with the same data, batch "
                             f"size, packing, ranks and workers, or start over")
        restored = from_plain(state["state"])
        self.loader.restore_state_rank(restored)
        self._yielded = self._trained = int(state.get("trained_batches", 0))
        self._snapshots = deque([(self._trained, "state", restored)])

    def trained_batches(self) -> int:
        return self._trained


def _snapshotting(wrapper: EnergonLoader):
    # Before iter(): with workers that have not started yet, Energon answers from its initial (or restored)
    # state; asked after iter() but before the first fetch it would wait for workers that do not exist yet.
    wrapper._snapshot()
    it = iter(wrapper.loader)
    while True:
        if not wrapper._workers:
            wrapper._snapshot()  # the state after the batches yielded so far
        try:
            batch = next(it)
        except StopIteration:
            return
        wrapper._yielded += 1
        if wrapper._workers:
            wrapper._snapshot()  # the workers' counters after this batch
        yield batch


class EnergonSource:
    """What `build_dataset` returns for an Energon path: the settings; `loader()` builds Energon's datasets."""

    prescan_skips: Counter = Counter()  # Energon samples are checked while streaming
    energon_source = True  # the model's data_loader asks for this loader

    def __init__(self, path: str, encoder: EnergonSampleEncoder, dp_rank: int, dp_size: int, dp_group=None,
                 split_part: str = "train"):
        require_energon()
        settings = encoder.settings
        self.path, self.encoder, self.seed = path, encoder, int(settings.seed)
        self.pad_id = int(encoder.tokenizer.pad_token_id)
        self.dp_rank, self.dp_size, self.dp_group = int(dp_rank), int(dp_size), dp_group
        self.num_workers, self.shuffle_buffer = int(settings.num_workers), int(settings.shuffle_buffer)
        self.max_samples_per_sequence = settings.max_samples_per_sequence
        self.packed_seq_length = settings.seq_length if settings.packed_sequence else None
        self.pack_buffer = int(settings.pack_window)
        self.split_part, self.strict = split_part, bool(settings.strict)
        self.fingerprint: dict = {}

    @property
    def skip_counts(self) -> Counter:
        return self.encoder.skip_counts

    def take_new_skips(self) -> Counter:
        return self.encoder.take_new_skips()

    def worker_config(self):
        from megatron.energon import WorkerConfig
        from megatron.energon.errors import log_exception, reraise_exception

        return WorkerConfig(rank=self.dp_rank, world_size=self.dp_size, num_workers=self.num_workers,
                            data_parallel_group=self.dp_group if self.dp_size > 1 else None,
                            seed_offset=self.seed,
                            global_error_handler=reraise_exception if self.strict else log_exception)

    def loader(self, batch_size: int, training: bool) -> EnergonLoader:
        """Training: Energon's repeating, shuffled, blended stream with a savable loader. Evaluation: one
        pass over `split_part` (default "val"; a dataset prepared with all samples in train: set
        model.data.energon_val_split=train)."""
        from megatron.energon import get_loader, get_savable_loader, get_train_dataset, get_val_dataset

        wc = self.worker_config()
        task_encoder = make_task_encoder(self.encoder, self.pad_id, self.packed_seq_length)
        packing = self.pack_buffer if self.packed_seq_length else None
        self.fingerprint = {"path": os.path.abspath(self.path), "batch_size": int(batch_size),
                            "dp_size": self.dp_size, "num_workers": self.num_workers, "seed": self.seed,
                            "shuffle_buffer": self.shuffle_buffer, "packed": self.packed_seq_length,
                            "pack_buffer": packing, "max_samples_per_sequence": self.max_samples_per_sequence}
        if training:
            ds = get_train_dataset(self.path, split_part=self.split_part, worker_config=wc, batch_size=batch_size,
                                   batch_drop_last=True, packing_buffer_size=packing,
                                   shuffle_buffer_size=self.shuffle_buffer if self.shuffle_buffer > 1 else None,
                                   max_samples_per_sequence=self.max_samples_per_sequence,
                                   task_encoder=task_encoder)
            # checkpoints kept by each worker: enough for the loader's prefetch plus the batch Lightning holds
            keep = 2 * max(self.num_workers, 1) + 3
            return EnergonLoader(get_savable_loader(ds, n_checkpoints=keep), self, savable=True)
        ds = get_val_dataset(self.path, split_part=self.split_part, worker_config=wc, batch_size=batch_size,
                             packing_buffer_size=packing, task_encoder=task_encoder)
        return EnergonLoader(get_loader(ds), self, savable=False)

    def summary(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.encoder.skip_counts.items())) or "none"
        return f"Energon dataset {self.path} (split {self.split_part}); skipped in this process: {skipped}"


def build_source(path: str, processor: NevaProcessor, settings: DatasetSettings, *, dp_rank: int, dp_size: int,
                 dp_group=None, split_part: str = "train") -> EnergonSource:
    """EnergonSource for an Energon dataset folder or metadataset YAML: the same processor and settings (same
    meaning) as the other data paths; `split_part`: "train", or validation's `settings.energon_val_split`."""
    return EnergonSource(path, EnergonSampleEncoder(processor, settings), dp_rank, dp_size, dp_group,
                         split_part=split_part)


# ---------------------------------------------------------------------------------------- checkpoint glue
def gather_states(loader: EnergonLoader, group=None) -> list:
    """Every DP rank's `energon_state()`, in DP-rank order, on every rank of the group (a collective)."""
    mine = loader.energon_state()
    if not torch.distributed.is_initialized() or loader.source.dp_size == 1:
        return [mine]
    out = [None] * loader.source.dp_size
    torch.distributed.all_gather_object(out, mine, group=group)
    return out


def restore_states(loader: EnergonLoader, states) -> None:
    if not isinstance(states, list) or len(states) != loader.source.dp_size:
        n = len(states) if isinstance(states, list) else "no"
        raise ValueError(f"this checkpoint holds {n} Energon data positions for {loader.source.dp_size} "
                         "data-parallel ranks; resume with the data-parallel size it was saved with")
    loader.load_energon_state(states[loader.source.dp_rank])


__all__ = ["is_energon_path", "build_source", "EnergonSource", "EnergonLoader", "sample_to_record",
           "make_task_encoder", "to_plain", "from_plain", "gather_states", "restore_states"]
