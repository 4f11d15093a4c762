"""MegatronNevaModel's data side: which dataset a `data_path` means (JSON, tar shards, blends, Energon), the
data-parallel loaders that resume at their position, and the skipped-sample reports."""
from __future__ import annotations

import logging
import os

import torch
from megatron.core import parallel_state
from omegaconf import OmegaConf

from nemo_neva.cli import resolve_path
from nemo_neva.training import megatron_step as mt

log = logging.getLogger(__name__)


class NevaDataMixin:
    """Datasets, loaders and skip reports of MegatronNevaModel (a mixin of it)."""

    # ------------------------------------------------------------------ data
    def data_settings(self, data_cfg=None) -> "DatasetSettings":
        """`model.data` (or `data_cfg`) with the model's seed and context, read once per dataset or loader (the
        records' ids, pixels and placeholder counts come from `self.processor`)."""
        from nemo_neva.data.settings import dataset_settings

        return dataset_settings(self.cfg, data_cfg, resolve=resolve_path)

    def build_dataset(self, data_cfg, data_path=None):
        """data_path: a file, shards, a list (concatenated) or a weighted blend [w1, path1, w2, path2, ...]."""
        from nemo_neva.data.blend import BlendedNevaDataset, parse_blend
        from nemo_neva.data.energon import build_source, is_energon_path
        from nemo_neva.data.shards import ShardedNevaDataset

        settings, processor = self.data_settings(data_cfg), self.processor
        path = data_path if data_path is not None else data_cfg.data_path
        path = OmegaConf.to_object(path) if OmegaConf.is_list(path) else path
        if isinstance(path, str) and is_energon_path(resolve_path(path)):  # data/energon.py (its own blends)
            split = settings.energon_val_split if data_path is not None else "train"
            return build_source(resolve_path(path), processor, settings, split_part=split,
                                dp_group=parallel_state.get_data_parallel_group(), **_dp_place())
        paths, weights = parse_blend(path)
        if weights is None:  # one file / shard spec, or a list of them concatenated
            return _source(path, processor, settings)
        sources = [_source(p, processor, settings) for p in paths]
        sharded = [isinstance(s, ShardedNevaDataset) for s in sources]
        if all(sharded):  # streamed: the blend is one more shard order (data/blended_shards.py)
            from nemo_neva.data.blended_shards import BlendedShardedDataset

            return BlendedShardedDataset(sources, weights, names=[str(p) for p in paths])
        if any(sharded):
            raise ValueError("model.data.data_path: a blend mixes tar shards and JSON files; use one kind "
                             "(convert the JSON files with scripts/convert_llava_to_shards.py)")
        return BlendedNevaDataset(sources, weights, seed=settings.seed, names=[str(p) for p in paths])

    def data_loader(self, dataset, data_cfg, shuffle):
        """The loader of a `build_dataset` dataset: training (`shuffle`: resumable, whole batches) or evaluation
        (every sample once). Each data-parallel rank loads global_batch_size / dp rows per step (its micro-batches).

        With `data.packed_sequence`, a row holds several samples (first-fit-decreasing to seq_length),
        isolated by THD cu_seqlens in the attention (`_thd`), with positions restarting per sample.
        """
        from nemo_neva.checkpoint.data_position import ResumableDistributedSampler
        from nemo_neva.data.collate import NevaCollator
        from nemo_neva.data.packing import PackedCollator, PackedNevaDataset
        from nemo_neva.data.shards import ShardedLoader, ShardedNevaDataset

        settings = self.data_settings(data_cfg)
        dp = parallel_state.get_data_parallel_world_size()
        mt.num_microbatches(self.cfg.global_batch_size, self.cfg.micro_batch_size, dp)
        per_rank = self.cfg.global_batch_size // dp
        if getattr(dataset, "energon_source", False):  # Energon's loader, one per DP rank (data/energon.py)
            return dataset.loader(per_rank, training=shuffle)
        if isinstance(dataset, ShardedNevaDataset):  # order, dp split and epochs live in the dataset
            dataset.shuffle = dataset.drop_remainder = shuffle
            if not shuffle and dataset.total % dp:  # ranks would run different numbers of steps (and hang)
                raise ValueError(f"model.data.validation_data_path: tar shards of {dataset.total} samples on {dp} "
                                 f"data-parallel ranks; validating every sample once needs a multiple of {dp} "
                                 "(or use a JSON/JSONL validation file, which any rank count takes)")
            if settings.packed_sequence:  # packed windows of the stream (data/packed_shards.py)
                from nemo_neva.data.packed_shards import PackedShardDataset, PackedShardLoader

                seq = settings.seq_length
                return PackedShardLoader(
                    PackedShardDataset(dataset, seq, window=settings.pack_window), batch_size=per_rank,
                    num_workers=settings.num_workers, drop_last=shuffle,
                    collate_fn=PackedCollator(self.tokenizer.pad_token_id, seq_length=seq,
                                              skip_source=dataset.take_new_skips))
            collate = NevaCollator(self.tokenizer.pad_token_id, skip_source=dataset.take_new_skips)
            return ShardedLoader(dataset, batch_size=per_rank, num_workers=settings.num_workers,
                                 collate_fn=collate, drop_last=shuffle)
        if settings.packed_sequence:
            seq = settings.seq_length
            dataset = PackedNevaDataset(dataset, seq)
            collate = PackedCollator(self.tokenizer.pad_token_id, seq_length=seq, skip_source=dataset.take_new_skips)
        else:
            collate = NevaCollator(self.tokenizer.pad_token_id, skip_source=dataset.take_new_skips)
        if shuffle:
            sampler = ResumableDistributedSampler(  # training: passes follow the global step (exact resume)
                dataset, num_replicas=dp, rank=parallel_state.get_data_parallel_rank(), shuffle=True,
                seed=settings.seed, drop_last=True, batch_size=per_rank,
                consumed_fn=self._consumed_samples,
            )
        else:  # evaluation: every sample once, the same number of steps on every rank (data/eval_sampling.py)
            from nemo_neva.data.eval_sampling import EvalBlanks, EvalSampler

            sampler = EvalSampler(len(dataset), dp, parallel_state.get_data_parallel_rank())
            dataset = EvalBlanks(dataset, blank=[] if isinstance(dataset, PackedNevaDataset) else None)
        return torch.utils.data.DataLoader(
            dataset, batch_size=per_rank, sampler=sampler, num_workers=settings.num_workers,
            collate_fn=collate, drop_last=shuffle,
        )

    def _consumed_samples(self) -> int:
        trainer = self._trainer
        return trainer.global_step * self.cfg.global_batch_size if trainer is not None else 0

    def setup_training_data(self, train_data_config):
        from nemo_neva.data.skip_tally import SkipTally

        self._train_ds = self.build_dataset(train_data_config)
        self._train_dl = self.data_loader(self._train_ds, train_data_config, shuffle=True)
        self._skip_tally = SkipTally(getattr(self._train_ds, "prescan_skips", None))
        if train_data_config.get("validation_data_path"):
            self.setup_validation_data(train_data_config)

    def setup_validation_data(self, val_data_config):
        self._validation_ds = self.build_dataset(val_data_config, val_data_config.validation_data_path)
        self._validation_dl = self.data_loader(self._validation_ds, val_data_config, shuffle=False)

    def _log_data_skips(self, batch, bs: int) -> None:
        """`data_skipped`: samples skipped so far (before training + while loading, every DP rank's
        DataLoader workers included); gathered over DP only on logging steps (same step on every rank)."""
        tally = getattr(self, "_skip_tally", None)
        if tally is None:
            return
        tally.add(batch)
        every = max(getattr(self._trainer, "log_every_n_steps", 1) or 1, 1) if self._trainer is not None else 1
        if self.global_step % every == 0:
            total = tally.global_counts(parallel_state.get_data_parallel_group())
            self.log("data_skipped", float(sum(total.values())), batch_size=bs)

    def on_train_epoch_end(self):
        summary = getattr(getattr(self, "_train_ds", None), "summary", None)
        if callable(summary):
            log.info("data: %s", summary())
        self._report_skips("so far")

    def on_train_end(self):
        self._report_skips("in training")

    def _report_skips(self, when: str) -> None:
        """Skip totals by reason over all DP ranks and workers; a warning with the fix when many are lost."""
        from nemo_neva.data.skip_tally import skip_report

        tally = getattr(self, "_skip_tally", None)
        if tally is None:
            return
        counts = tally.global_counts(parallel_state.get_data_parallel_group())
        line, loud = skip_report(counts, getattr(getattr(self, "_train_ds", None), "total", None))
        if parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0:
            (log.warning if loud else log.info)("data %s: %s", when, line)


def _dp_place() -> dict:
    """This rank's place among the data-parallel ranks (megatron-core parallel_state)."""
    return {"dp_rank": parallel_state.get_data_parallel_rank(),
            "dp_size": parallel_state.get_data_parallel_world_size()}


def _source(path, processor, settings):
    """One data_path entry: tar shards (streamed, dealt over DP ranks) or a JSON/JSONL file (or a list of them)."""
    from nemo_neva.data.dataset import NevaDataset
    from nemo_neva.data.shards import ShardedNevaDataset, is_shard_spec

    paths = [resolve_path(p) for p in path] if isinstance(path, (list, tuple)) else resolve_path(path)
    if isinstance(paths, str) and "{" in paths:  # a shard pattern: resolve its folder
        paths = os.path.join(resolve_path(os.path.dirname(paths)) or "", os.path.basename(paths))
    if is_shard_spec(paths):  # tar shards from scripts/convert_llava_to_shards.py: streamed
        return ShardedNevaDataset(paths, processor, settings, **_dp_place())
    return NevaDataset(paths, processor, settings)
