"""What a dataset is built from, besides the model's `NevaProcessor` (data/processor.py: tokenizer, image
preprocessing, placeholder counts): `DatasetSettings`, `model.data`'s keys (+ the model's seed) read once by
`dataset_settings`; the defaults of every key live here, in the dataclass.

Every data path (JSON `NevaDataset`, tar shards, Energon) takes the same two objects.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping, Optional

from nemo_neva.data.image_io import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from nemo_neva.data.video_io import VideoSettings
from nemo_neva.data.video_samples import VideoLimits, video_options_of

DEFAULT_SEED = 1234  # model.seed's default (conf/neva_pretrain.yaml)


def seed_of(model_cfg) -> int:
    """`model.seed` (absent: DEFAULT_SEED): the one seed of weights init, LoRA, data order and blends."""
    return model_cfg.get("seed", DEFAULT_SEED)


def seq_length_of(model_cfg, data_cfg=None) -> int:
    """`model.data.seq_length`, or (null / absent) the model's `encoder_seq_length`."""
    data_cfg = model_cfg.get("data") if data_cfg is None else data_cfg
    return (data_cfg.get("seq_length") if data_cfg is not None else None) or model_cfg.encoder_seq_length


@dataclass(frozen=True)
class DatasetSettings:
    """`model.data` as the datasets and loaders read it (the comments name the key where it differs)."""
    seq_length: int = 2048  # null in the config: the model's encoder_seq_length
    template: str = "plain"  # conv_template: data/conversation.py's conversation template
    strict: bool = False  # a bad sample is an error instead of a counted skip
    image_folder: Optional[str] = None
    video_folder: Optional[str] = None  # None: image_folder
    video_settings: VideoSettings = VideoSettings()  # video.{num_frames, sampling}
    video_limits: VideoLimits = VideoLimits()  # video.{max_bytes, max_frames, max_pixels}
    max_images_per_sample: int = 8
    max_image_tokens: Optional[int] = None  # max_image_tokens_per_sample; None: only seq_length bounds them
    max_image_bytes: int = DEFAULT_MAX_BYTES  # one image file (image_too_large)
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # one decoded image (image_too_many_pixels)
    prescan_images: bool = True  # JSON: check every image header at construction (not in the config)
    steerlm_defaults: Optional[Mapping[str, int]] = None  # nv_steerlm attributes a record leaves out
    system_prompt: Optional[str] = None  # a record without "system" gets this (None: the template's)
    seed: int = DEFAULT_SEED  # model.seed: shard order, blends, the training sampler, Energon
    shuffle_buffer: int = 1000  # tar shards / Energon: samples in the shuffle buffer
    num_workers: int = 0
    packed_sequence: bool = False
    pack_window: int = 1000  # tar shards / Energon with packed_sequence: samples packed together
    max_samples_per_sequence: Optional[int] = 100  # Energon
    energon_val_split: str = "val"

    def __post_init__(self):
        mit = self.max_image_tokens
        if mit is not None and (isinstance(mit, bool) or int(mit) < 1):
            raise ValueError(f"model.data.max_image_tokens_per_sample must be >= 1 or null, got {mit!r}")
        if int(self.max_images_per_sample) < 1:
            raise ValueError(f"max_images_per_sample must be >= 1, got {self.max_images_per_sample}")
        if int(self.seq_length) < 1:
            raise ValueError(f"model.data.seq_length must be >= 1, got {self.seq_length}")


# model.data key -> field, where the names differ
_RENAMED = {"max_image_tokens_per_sample": "max_image_tokens", "conv_template": "template"}
# fields not read by their name from model.data: worked out below, or set by callers (tests, tools)
_NOT_FROM_CONFIG = {"seq_length", "seed", "image_folder", "video_folder", "video_settings", "video_limits",
                    "prescan_images", "steerlm_defaults", "system_prompt"}


def dataset_settings(model_cfg, data_cfg=None, resolve=None) -> DatasetSettings:
    """The settings of `model.data` (or `data_cfg`, a variant of it) for a model config; `resolve` maps the
    image / video folders to real paths (nemo_neva.cli.resolve_path). Keys the config leaves out keep the
    dataclass's defaults; bad values fail here."""
    data_cfg = model_cfg.get("data") if data_cfg is None else data_cfg
    data_cfg = {} if data_cfg is None else data_cfg
    resolve = resolve or (lambda path: path)
    names = {f.name for f in fields(DatasetSettings)} - _NOT_FROM_CONFIG
    given = {_RENAMED.get(key, key): data_cfg[key] for key in data_cfg
             if _RENAMED.get(key, key) in names}
    video_settings, video_limits = video_options_of(data_cfg)  # model.data.video (bad values fail here)
    return DatasetSettings(
        seq_length=seq_length_of(model_cfg, data_cfg), seed=seed_of(model_cfg),
        image_folder=resolve(data_cfg.get("image_folder")), video_folder=resolve(data_cfg.get("video_folder")),
        video_settings=video_settings, video_limits=video_limits, **given)


__all__ = ["DEFAULT_SEED", "seed_of", "seq_length_of", "DatasetSettings", "dataset_settings"]
