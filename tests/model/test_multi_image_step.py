"""The tiny model on batches mixing 0-, 1- and 2-image samples: a training step's loss (megatron-core schedule,
two micro-batches, images split by num_images) and a packed row's loss equal the per-token mean of the samples
run one by one; model.data.max_images_per_sample reaches the dataset.

Tolerance 2e-6 relative: the same fp32 per-token terms summed in another order (micro-batches, padding of
other lengths) differ by ~1e-7 relative here (9e-8 for the step, 5e-8 packed), so 20x that noise. A misplaced
image moves the loss by more: swapping the two images of one sample moves its loss by ~1.4e-4 relative with
this tiny random model (asserted > 20x the tolerance), so a wrong image split would fail the check.
"""
import json
import os

import pytest
import torch

from nemo_neva import build_model
from nemo_neva.data.collate import NevaCollator
from nemo_neva.data.dataset import NevaDataset
from nemo_neva.data.packing import PackedCollator
from tests.model.helpers import ROOT, tiny_model_cfg

IMAGES = os.path.join(ROOT, "data", "shapes_demo", "images")
# one sample's loss alone vs in a batch of other rows (fp32 sums over other layouts): measured <= 8.6e-8
# relative; 2e-6 is ~20x that, and swapping a sample's two images moves its loss by far more (checked below)
RTOL = 2e-6


def _conv(*pairs):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(pairs)]


RECORDS = [
    {"id": "two", "image": ["train_00000.png", "train_00001.png"],
     "conversations": _conv("<image>\nWhat is this?", "a red circle", "And <image>?", "a blue square")},
    {"id": "text", "conversations": _conv("Say hi.", "hi there")},
    {"id": "one", "image": "train_00002.png", "conversations": _conv("<image>\nColour?", "green")},
    {"id": "two_first", "image": ["train_00003.png", "train_00004.png"],
     "conversations": _conv("Which has more shapes?", "the second")},  # tags put first
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("mi") / "mixed.json"
    path.write_text(json.dumps(RECORDS))
    cfg = tiny_model_cfg(**{"mm_cfg.llm.freeze": False, "encoder_seq_length": 128, "data.conv_template": "vicuna_v1",
                            "data.data_path": str(path), "data.image_folder": IMAGES,
                            "global_batch_size": 4, "micro_batch_size": 2, "optim.sched": None})
    torch.manual_seed(3)
    model = build_model(cfg)
    ds = model.build_dataset(cfg.data)
    items = [ds[i] for i in range(len(ds))]
    assert [0 if it["images"] is None else it["images"].shape[0] for it in items] == [2, 0, 1, 2]
    return model, cfg, items


def _per_sample_mean(model, items):
    """The per-token mean loss of the samples run one at a time, and each sample's (loss sum, tokens)."""
    sums = []
    with torch.no_grad():
        for it in items:
            loss, tokens = model.loss_from_batch(NevaCollator(model.tokenizer.pad_token_id)([it]))
            sums.append((float(loss) * float(tokens), float(tokens)))
    return sum(s for s, _ in sums) / sum(n for _, n in sums), sums


def test_mixed_image_training_step_equals_samples_one_by_one(setup):
    model, cfg, items = setup
    model.train()
    ref, sums = _per_sample_mean(model, items)
    # sensitivity: the first sample with its two images swapped gives another loss, far beyond the tolerance
    swapped = dict(items[0], images=items[0]["images"].flip(0))
    with torch.no_grad():
        loss_swapped, n = model.loss_from_batch(NevaCollator(model.tokenizer.pad_token_id)([swapped]))
    assert abs(float(loss_swapped) * float(n) - sums[0][0]) > 20 * RTOL * sums[0][0]
    batch = NevaCollator(model.tokenizer.pad_token_id)(items)
    assert batch["num_images"].tolist() == [2, 0, 1, 2] and batch["images"].shape[0] == 5
    opt = model.configure_optimizers()
    loss = model.train_on_batch(batch, opt)  # 2 micro-batches: images [2 | 1 + 2] by num_images
    assert torch.isfinite(loss)
    assert float(loss) == pytest.approx(ref, rel=RTOL)


def test_packed_rows_with_zero_one_and_two_images(setup):
    model, cfg, items = setup
    model.eval()
    ref, _ = _per_sample_mean(model, items)
    rows = [[items[0], items[1]], [items[2], items[3]]]  # 2+0 and 1+2 images per row
    packed = PackedCollator(model.tokenizer.pad_token_id, seq_length=256)(rows)
    assert packed["num_images"].tolist() == [2, 3]
    with torch.no_grad():
        loss, tokens = model.loss_from_batch(packed)
    assert float(loss) == pytest.approx(ref, rel=RTOL)


def test_max_images_per_sample_reaches_the_dataset(setup):
    model, cfg, _ = setup
    cfg = cfg.copy()
    cfg.data.max_images_per_sample = 1
    ds = model.build_dataset(cfg.data)
    assert isinstance(ds, NevaDataset) and dict(ds.skip_counts) == {"too_many_images": 2}
    assert [r["id"] for r in ds.records] == ["text", "one"]
