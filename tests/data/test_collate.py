"""NevaCollator: next-token shift, padding, masks, images in sample order."""
import pytest
import torch

from nemo_neva.data.collate import NevaCollator
from nemo_neva.data.constants import IGNORE_INDEX

I = IGNORE_INDEX


def item(ids, labels, image=None, sid="x"):
    """An item with one image [3, H, W] (or a stack [n, 3, H, W]), or none."""
    images = None if image is None else (image if image.ndim == 4 else image.unsqueeze(0))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "images": images, "id": sid}


def test_shift_pad_and_images():
    img_a, img_c = torch.full((3, 4, 4), 1.0), torch.full((3, 4, 4), 3.0)
    a = item([5, 6, 7, 8, 9], [I, I, 7, 8, 9], img_a, "a")
    b = item([5, 6, 7], [I, I, 7], None, "b")
    c = item([1, 2, 3, 4], [I, 2, I, 4], img_c, "c")
    out = NevaCollator(pad_id=0)([a, b, c])
    assert out["tokens"].tolist() == [[5, 6, 7, 8], [5, 6, 0, 0], [1, 2, 3, 0]]
    assert out["labels"].tolist() == [[0, 7, 8, 9], [0, 7, 0, 0], [2, 0, 4, 0]]
    assert out["loss_mask"].tolist() == [[0, 1, 1, 1], [0, 1, 0, 0], [1, 0, 1, 0]]
    assert out["loss_mask"].dtype == torch.float32
    assert out["position_ids"].tolist() == [[0, 1, 2, 3]] * 3
    assert out["num_images"].tolist() == [1, 0, 1]
    assert torch.equal(out["images"], torch.stack([img_a, img_c]))  # sample order
    assert int(out["num_dropped"]) == 0 and out["ids"] == ["a", "b", "c"]


def test_dropped_items_become_masked_rows():
    a = item([5, 6, 7], [I, 6, 7], torch.zeros(3, 2, 2))
    out = NevaCollator(pad_id=9)([None, a, None])
    assert out["tokens"].shape == (3, 2) and out["tokens"][0].tolist() == [9, 9]
    assert out["loss_mask"].sum(1).tolist() == [0, 2, 0]
    assert out["num_images"].tolist() == [0, 1, 0] and out["images"].shape == (1, 3, 2, 2)
    assert int(out["num_dropped"]) == 2


def test_no_images_no_targets_still_valid():
    out = NevaCollator(pad_id=0)([item([1, 2], [I, I]), None])
    assert out["images"] is None and out["num_images"].tolist() == [0, 0]
    assert out["loss_mask"].sum() == 0 and out["tokens"].shape == (2, 1)
    assert (out["labels"] >= 0).all()  # no ignore index reaches megatron's cross-entropy


def test_pad_to_fixed_length():
    out = NevaCollator(pad_id=0, pad_to=6)([item([1, 2, 3], [I, 2, 3])])
    assert out["tokens"].shape == (1, 6) and out["position_ids"][0].tolist() == list(range(6))
    with pytest.raises(ValueError, match="pad_to"):
        NevaCollator(pad_id=0, pad_to=1)([item([1, 2, 3], [I, 2, 3])])
