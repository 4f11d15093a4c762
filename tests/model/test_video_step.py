"""A "video" training sample through the tiny model: model.data.video_folder / video.num_frames / video limits
reach the dataset, a training step (megatron-core schedule) on a batch mixing a video, an image and text gives
a finite loss, and the frames reach the LM (reversing a video's frames changes its loss)."""
import json
import os

import numpy as np
import pytest
import torch

from nemo_neva import MegatronNevaModel
from nemo_neva.data.collate import NevaCollator
from nemo_neva.data.video_writer import write_video
from tests.model.helpers import ROOT, tiny_model_cfg

av = pytest.importorskip("av")
IMAGES = os.path.join(ROOT, "data", "shapes_demo", "images")
FRAMES = 3


def _conv(*pairs):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(pairs)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vid")
    rng = np.random.default_rng(0)
    write_video(tmp / "clip.mp4", [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(6)])
    records = [
        {"id": "video", "video": "clip.mp4", "conversations": _conv("<video>\nWhich way?", "left to right")},
        {"id": "image", "image": "train_00000.png", "conversations": _conv("<image>\nColour?", "red")},
        {"id": "text", "conversations": _conv("Say hi.", "hi there")},
        {"id": "both", "image": "train_00001.png", "video": "clip.mp4",
         "conversations": _conv("<video> or <image>?", "the video")},
    ]
    (tmp / "v.json").write_text(json.dumps(records))
    cfg = tiny_model_cfg(**{"mm_cfg.llm.freeze": False, "encoder_seq_length": 128, "data.conv_template": "vicuna_v1",
                            "data.data_path": str(tmp / "v.json"), "data.image_folder": IMAGES,
                            "data.video_folder": str(tmp), "data.video.num_frames": FRAMES,
                            "global_batch_size": 4, "micro_batch_size": 2, "optim.sched": None})
    torch.manual_seed(0)
    model = MegatronNevaModel(cfg)
    return model, cfg


def test_video_sample_training_step(setup):
    model, cfg = setup
    ds = model.build_dataset(cfg.data)
    items = [ds[i] for i in range(len(ds))]
    assert [0 if it["images"] is None else it["images"].shape[0] for it in items] == [FRAMES, 1, 0, FRAMES + 1]
    P = model.tokens_per_image
    assert int((items[0]["input_ids"] == model.image_token_id).sum()) == FRAMES * P
    collate = NevaCollator(model.tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():  # the frames reach the LM: the same video with its frames reversed scores differently
        loss, _ = model.loss_from_batch(collate([items[0]]))
        rev, _ = model.loss_from_batch(collate([dict(items[0], images=items[0]["images"].flip(0))]))
    assert torch.isfinite(loss) and float(loss) != float(rev)
    model.train()
    step = model.train_on_batch(collate(items), model.configure_optimizers())
    assert torch.isfinite(step)


def test_video_limits_reach_the_dataset(setup):
    model, cfg = setup
    cfg = cfg.copy()
    cfg.data.video.max_frames = 5  # clip.mp4 has 6
    ds = model.build_dataset(cfg.data)
    assert dict(ds.skip_counts) == {"video_too_many_frames": 2}
    assert [r["id"] for r in ds.records] == ["image", "text"]
    cfg.data.video.max_frames = 0
    with pytest.raises(ValueError, match="model.data.video.max_frames must be an integer >= 1"):
        model.build_dataset(cfg.data)
