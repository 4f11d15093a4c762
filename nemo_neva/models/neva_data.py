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
    def build_dataset(self, data_cfg, data_path=None):
        """data_path: a file, shards, a list (concatenated) or a weighted blend [w1, path1, w2, path2, ...]."""
        from nemo_neva.data.blend import BlendedNevaDataset, parse_blend
        from nemo_neva.data.energon import is_energon_path
        from nemo_neva.data.shards import ShardedNevaDataset

        path = data_path if data_path is not None else data_cfg.data_path
        path = OmegaConf.to_object(path) if OmegaConf.is_list(path) else path
        if isinstance(path, str) and is_energon_path(resolve_path(path)):  # data/energon.py (its own blends)
            return self._energon_source(data_cfg, resolve_path(path), validation=data_path is not None)
        paths, weights = parse_blend(path)
        if weights is None:  # one file / shard spec, or a list of them concatenated
            return self._build_source(data_cfg, path)
        sources = [self._build_source(data_cfg, p) for p in paths]
        sharded = [isinstance(s, ShardedNevaDataset) for s in sources]
        if all(sharded):  # streamed: the blend is one more shard order (data/blended_shards.py)
            from nemo_neva.data.blended_shards import BlendedShardedDataset

            return BlendedShardedDataset(sources, weights, names=[str(p) for p in paths])
        if any(sharded):
            raise ValueError("model.data.data_path: a blend mixes tar shards and JSON files; use one kind "
                             "(convert the JSON files with scripts/convert_llava_to_shards.py)")
        return BlendedNevaDataset(sources, weights, seed=self.cfg.get("seed", 1234), names=[str(p) for p in paths])

    def _build_source(self, data_cfg, path):
        from nemo_neva.data.dataset import DEFAULT_MAX_IMAGES, NevaDataset
        from nemo_neva.data.shards import ShardedNevaDataset, is_shard_spec
        from nemo_neva.data.video_samples import video_options_of

        video_settings, video_limits = video_options_of(data_cfg)  # model.data.video (bad values fail here)

        paths = [resolve_path(p) for p in path] if isinstance(path, (list, tuple)) else resolve_path(path)
        if isinstance(paths, str) and "{" in paths:  # a shard pattern: resolve its folder
            paths = os.path.join(resolve_path(os.path.dirname(paths)) or "", os.path.basename(paths))
        if is_shard_spec(paths):  # tar shards from scripts/convert_llava_to_shards.py: streamed
            return ShardedNevaDataset(
                paths, self.tokenizer, self.pixel_processor, tiling=self.tiling,
                video_settings=video_settings, video_limits=video_limits,
                template=data_cfg.get("conv_template", "plain"),
                image_aspect_ratio=self.image_aspect_ratio,
                seq_length=data_cfg.get("seq_length") or self.cfg.encoder_seq_length,
                num_image_tokens=self.tokens_per_image, strict=data_cfg.get("strict", False),
                dp_rank=parallel_state.get_data_parallel_rank(),
                dp_size=parallel_state.get_data_parallel_world_size(), seed=self.cfg.get("seed", 1234),
                shuffle_buffer=data_cfg.get("shuffle_buffer", 1000),
                max_images_per_sample=data_cfg.get("max_images_per_sample", DEFAULT_MAX_IMAGES),
                num_frame_tokens=self.tokens_per_frame,
                max_image_tokens=data_cfg.get("max_image_tokens_per_sample"),
            )
        return NevaDataset(
            data_path=paths,
            image_folder=resolve_path(data_cfg.get("image_folder")),
            tokenizer=self.tokenizer,
            image_processor=self.pixel_processor,
            tiling=self.tiling,
            template=data_cfg.get("conv_template", "plain"),
            image_aspect_ratio=self.image_aspect_ratio,
            seq_length=data_cfg.get("seq_length") or self.cfg.encoder_seq_length,
            num_image_tokens=self.tokens_per_image, num_frame_tokens=self.tokens_per_frame,
            strict=data_cfg.get("strict", False),
            max_images_per_sample=data_cfg.get("max_images_per_sample", DEFAULT_MAX_IMAGES),
            max_image_tokens=data_cfg.get("max_image_tokens_per_sample"),
            video_folder=resolve_path(data_cfg.get("video_folder")),
            video_settings=video_settings, video_limits=video_limits,
        )

    def _energon_source(self, data_cfg, path, validation=False):
        from nemo_neva.data.energon import build_source

        return build_source(data_cfg, path, tokenizer=self.tokenizer, image_processor=self.pixel_processor,
                            tiling=self.tiling, num_frame_tokens=self.tokens_per_frame,
                            seq_length=data_cfg.get("seq_length") or self.cfg.encoder_seq_length,
                            num_image_tokens=self.tokens_per_image, seed=self.cfg.get("seed", 1234),
                            dp_rank=parallel_state.get_data_parallel_rank(),
                            dp_size=parallel_state.get_data_parallel_world_size(),
                            dp_group=parallel_state.get_data_parallel_group(),
                            split_part=data_cfg.get("energon_val_split", "val") if validation else "train")

    def _loader(self, dataset, data_cfg, shuffle):
        """Each data-parallel rank loads global_batch_size / dp rows per step (its micro-batches).

        With `data.packed_sequence`, a row holds several samples (first-fit-decreasing to seq_length),
        isolated by THD cu_seqlens in the attention (`_thd`), with positions restarting per sample.
        """
        from nemo_neva.checkpoint.data_position import ResumableDistributedSampler
        from nemo_neva.data.collate import NevaCollator
        from nemo_neva.data.packing import PackedCollator, PackedNevaDataset
        from nemo_neva.data.shards import ShardedLoader, ShardedNevaDataset

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
            if data_cfg.get("packed_sequence", False):  # packed windows of the stream (data/packed_shards.py)
                from nemo_neva.data.packed_shards import PackedShardDataset, PackedShardLoader

                seq = data_cfg.get("seq_length") or self.cfg.encoder_seq_length
                return PackedShardLoader(
                    PackedShardDataset(dataset, seq, window=data_cfg.get("pack_window", 1000)), batch_size=per_rank,
                    num_workers=data_cfg.get("num_workers", 0), drop_last=shuffle,
                    collate_fn=PackedCollator(self.tokenizer.pad_token_id, seq_length=seq,
                                              skip_source=dataset.take_new_skips))
            collate = NevaCollator(self.tokenizer.pad_token_id, skip_source=dataset.take_new_skips)
            return ShardedLoader(dataset, batch_size=per_rank, num_workers=data_cfg.get("num_workers", 0),
                                 collate_fn=collate, drop_last=shuffle)
        if data_cfg.get("packed_sequence", False):
            seq = data_cfg.get("seq_length") or self.cfg.encoder_seq_length
            dataset = PackedNevaDataset(dataset, seq)
            collate = PackedCollator(self.tokenizer.pad_token_id, seq_length=seq, skip_source=dataset.take_new_skips)
        else:
            collate = NevaCollator(self.tokenizer.pad_token_id, skip_source=dataset.take_new_skips)
        if shuffle:
            sampler = ResumableDistributedSampler(  # training: passes follow the global step (exact resume)
                dataset, num_replicas=dp, rank=parallel_state.get_data_parallel_rank(), shuffle=True,
                seed=self.cfg.get("seed", 1234), drop_last=True, batch_size=per_rank,
                consumed_fn=self._consumed_samples,
            )
        else:  # evaluation: every sample once, the same number of steps on every rank (data/eval_sampling.py)
            from nemo_neva.data.eval_sampling import EvalBlanks, EvalSampler

            sampler = EvalSampler(len(dataset), dp, parallel_state.get_data_parallel_rank())
            dataset = EvalBlanks(dataset, blank=[] if isinstance(dataset, PackedNevaDataset) else None)
        return torch.utils.data.DataLoader(
            dataset, batch_size=per_rank, sampler=sampler, num_workers=data_cfg.get("num_workers", 0),
            collate_fn=collate, drop_last=shuffle,
        )

    def _consumed_samples(self) -> int:
        trainer = self._trainer
        return trainer.global_step * self.cfg.global_batch_size if trainer is not None else 0

    def setup_training_data(self, train_data_config):
        from nemo_neva.data.skip_tally import SkipTally

        self._train_ds = self.build_dataset(train_data_config)
        self._train_dl = self._loader(self._train_ds, train_data_config, shuffle=True)
        self._skip_tally = SkipTally(getattr(self._train_ds, "prescan_skips", None))
        if train_data_config.get("validation_data_path"):
            self.setup_validation_data(train_data_config)

    def setup_validation_data(self, val_data_config):
        self._validation_ds = self.build_dataset(val_data_config, val_data_config.validation_data_path)
        self._validation_dl = self._loader(self._validation_ds, val_data_config, shuffle=False)

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
