"""`model.data` -> DatasetSettings: read once, defaults from the dataclass, every shipped key read by code."""
import dataclasses
import os

import pytest
from omegaconf import OmegaConf, open_dict
from PIL import Image

from neva_data_helpers import conv, write_json
from nemo_neva.data.dataset import NevaDataset, StreamedRecordEncoder
from nemo_neva.data.processor import NevaProcessor
from nemo_neva.data.settings import DatasetSettings, dataset_settings, seed_of, seq_length_of
from nemo_neva.cli import shipped_config

# model.data keys that are not settings: which records (paths), the image preprocessing (the model's
# NevaProcessor) and model.data.video (read into DatasetSettings.video_settings / video_limits)
READ_ELSEWHERE = {"data_path", "validation_data_path", "image_aspect_ratio", "video"}


def pretrain_model_cfg():
    return shipped_config("neva_pretrain").model


def test_shipped_pretrain_data_block_becomes_its_settings():
    cfg = pretrain_model_cfg()
    s = dataset_settings(cfg)
    assert s.seq_length == cfg.encoder_seq_length == 128  # seq_length: ${model.encoder_seq_length}
    assert s.seed == cfg.seed == 1234
    assert (s.strict, s.num_workers, s.packed_sequence, s.pack_window, s.shuffle_buffer) == (False, 0, False, 1000, 1000)
    assert s.image_folder == cfg.data.image_folder and s.video_folder is None
    assert (s.video_settings.num_frames, s.video_settings.sampling) == (8, "uniform")
    assert s.video_limits.max_frames == cfg.data.video.max_frames
    assert s.max_images_per_sample == 8 and s.max_image_tokens is None


def test_every_shipped_data_key_is_read():
    """No key of the shipped model.data that no code reads: each is a settings field or read elsewhere."""
    names = {f.name for f in dataclasses.fields(DatasetSettings)} | {"max_image_tokens_per_sample", "conv_template"}
    for conf in ("neva_pretrain", "neva_finetune", "neva_peft"):
        data = shipped_config(conf).model.data
        assert set(data) - names - READ_ELSEWHERE == set(), conf


def test_absent_keys_keep_the_dataclass_defaults_and_null_seq_length_is_the_models():
    cfg = OmegaConf.create({"encoder_seq_length": 96, "data": {"seq_length": None}})
    s = dataset_settings(cfg)
    assert s.seq_length == seq_length_of(cfg) == 96
    assert dataclasses.replace(s, seq_length=DatasetSettings.seq_length) == DatasetSettings()
    assert seed_of(cfg) == DatasetSettings.seed
    with open_dict(cfg):
        cfg.data.seq_length, cfg.seed, cfg.data.max_image_tokens_per_sample = 64, 7, 300
    s = dataset_settings(cfg)
    assert (s.seq_length, s.seed, s.max_image_tokens) == (64, 7, 300)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seq_length = 1


@pytest.mark.parametrize("key,value,match", [
    ("max_image_tokens_per_sample", 0, "max_image_tokens_per_sample must be >= 1 or null, got 0"),
    ("max_images_per_sample", 0, "max_images_per_sample must be >= 1"),
])
def test_bad_values_fail_when_read(key, value, match):
    cfg = OmegaConf.create({"encoder_seq_length": 64, "data": {key: value}})
    with pytest.raises(ValueError, match=match):
        dataset_settings(cfg)


def test_image_byte_limit_of_model_data_is_applied(tmp_path, tok, proc):
    """model.data.max_image_bytes (the fix skip_tally names for image_too_large) reaches the dataset."""
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "img" / "a.png")
    size = os.path.getsize(tmp_path / "img" / "a.png")
    recs = [{"id": "a", "image": "a.png", "conversations": conv("<image>", "red")},
            {"id": "t", "conversations": conv("hi", "there")}]
    path = write_json(tmp_path / "d.json", recs)
    processor = NevaProcessor(tok, proc, tokens_per_image=4)
    for limit, skips in ((size, {}), (size - 1, {"image_too_large": 1})):
        cfg = OmegaConf.create({"encoder_seq_length": 64, "data": {"image_folder": str(tmp_path / "img"),
                                                                  "max_image_bytes": limit}})
        assert dict(NevaDataset(path, processor, dataset_settings(cfg)).skip_counts) == skips


def test_streamed_encoder_is_a_record_encoder_not_a_dataset(tok, proc):
    encoder = StreamedRecordEncoder(NevaProcessor(tok, proc, tokens_per_image=4), DatasetSettings(seq_length=64))
    assert not isinstance(encoder, NevaDataset) and encoder.images is None and encoder.seq_length == 64
    item = encoder.streamed_item({"conversations": conv("hi", "there")}, "t")
    assert item["images"] is None and item["id"] == "t"


def test_conv_template_is_the_settings_template():
    cfg = OmegaConf.create({"encoder_seq_length": 64, "data": {"conv_template": "vicuna_v1"}})
    assert dataset_settings(cfg).template == "vicuna_v1"
    assert dataset_settings(OmegaConf.create({"encoder_seq_length": 64})).template == DatasetSettings.template


def test_the_datasets_processor_pickles_and_makes_the_same_items(tmp_path, tok, proc):
    """A dataset's processor (tokenizer, image processor, the tiling processor it built) pickles, as workers
    started by spawn / forkserver need; a copy makes the same pixels and placeholder counts. (DataLoader workers
    here fork: the dataset itself is not pickled, its ImageSource holds a thread-local.)"""
    import pickle

    import torch

    from nemo_neva.modules.tiling import Tiling

    (tmp_path / "img").mkdir()
    image = Image.new("RGB", (40, 90), (1, 2, 3))
    image.save(tmp_path / "img" / "a.png")
    path = write_json(tmp_path / "d.json", [{"id": "a", "image": "a.png", "conversations": conv("<image>", "red")}])
    tiling = Tiling(((32, 64), (64, 32)), 32, 2)
    ds = NevaDataset(path, NevaProcessor(tok, proc, tokens_per_image=4, tiling=tiling),
                     DatasetSettings(seq_length=128, image_folder=str(tmp_path / "img")))
    item = ds[0]  # the processor has built its tiling image processor now
    copy = pickle.loads(pickle.dumps(ds.processor))
    assert torch.equal(copy.preprocess_images(image), item["images"][0])
    assert copy.size_token_count(90, 40) == int((item["input_ids"] == ds.image_token_id).sum()) == tiling.tokens(90, 40)


@pytest.mark.parametrize("counts", [dict(tokens_per_image=0), dict(tokens_per_image=4, tokens_per_frame=0)])
def test_a_processor_without_placeholders_is_refused(tok, proc, counts):
    """What RecordEncoding checked before the datasets took the processor: a zero-length run would drop the image."""
    with pytest.raises(ValueError, match=r"placeholders per image \(\d+\) and per video frame \(\d+\) must be >= 1"):
        NevaProcessor(tok, proc, **counts)
