"""A "video" training sample through the tiny model: model.data.video_folder / video.num_frames / video limits
reach the dataset, a training step (megatron-core schedule) on a batch mixing a video, an image and text gives
a finite loss, and the frames reach the LM (reversing a video's frames changes its loss)."""

import pytest
import torch

from nemo_neva.data.collate import NevaCollator
from tests.model.helpers import video_model
from tests.optional import require

av = require("av")
FRAMES = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return video_model(tmp_path_factory.mktemp("vid"), "<video> or <image>?", FRAMES)


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
