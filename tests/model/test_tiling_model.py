"""anyres tiling in training: images of different sizes (so different placeholder counts) in one batch, through
the LLaVA JSON dataset, the collator, micro-batch splitting and packed rows. Oracles: each row's loss alone
(batching must not move features between rows) and the unpacked batch (packing must not either); the counts
themselves are checked against transformers in tests/data/test_tiling.py and tests/export/test_llava_next.py."""
import itertools
import json
import os

import pytest
import torch
from PIL import Image

from nemo_neva import build_model
from nemo_neva.data.collate import NevaCollator
from nemo_neva.data.dataset import NevaDataset
from nemo_neva.data.packing import PackedCollator
from nemo_neva.data.settings import DatasetSettings
from nemo_neva.modules.neva_module import ImageTokenMismatch
from nemo_neva.training.megatron_step import pad_to_microbatches, split_microbatches
from tests.model.helpers import TILED_SIZES, llama_overrides, tiled_batch_for, tiny_model_cfg
from tests.optional import require

SEQ = 512
# Same weights and kernels, only the batch around a row differs: CPU matmul / SDPA may then sum in another
# order, a few 1e-7 on O(1)..O(10) per-token losses; 1e-5 leaves room and still catches a misplaced feature row
# (that moves a row's loss by > 1e-3).
ATOL = 1e-5
SIZES = TILED_SIZES


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = tiny_model_cfg(**llama_overrides(), **{"mm_cfg.image_tiling.enabled": True, "mm_cfg.llm.freeze": False,
                                                  "encoder_seq_length": SEQ})
    return build_model(cfg).eval()


def _per_token(model, b):
    with torch.no_grad():
        return model.model(b["tokens"], b["position_ids"], images=b.get("images"), labels=b["labels"],
                           num_images=b["num_images"], image_sizes=b.get("image_sizes"))


def test_rows_with_different_image_counts_give_their_own_losses(model):
    batch = tiled_batch_for(model, SIZES, 160, seed=1)
    counts = [[model.tiling.tokens(h, w) for h, w in row] for row in SIZES]
    assert len({c for row in counts for c in row}) == 4  # four images, four different counts
    together = _per_token(model, batch)
    for r, alone in enumerate(split_microbatches(batch, 1)):  # row r with its own images and sizes
        assert (alone.get("image_sizes") is None) == (not SIZES[r])
        torch.testing.assert_close(_per_token(model, alone)[0], together[r], atol=ATOL, rtol=0)


def test_backward_trains_projector_and_newline_not_the_frozen_tower(model):
    batch = tiled_batch_for(model, SIZES, 160, seed=2)
    model.zero_grad(set_to_none=True)
    model.train()
    try:
        loss, _ = model.loss_from_batch(batch)
        loss.backward()
    finally:
        model.eval()
    assert torch.isfinite(loss)
    assert model.model.image_newline.grad is not None and model.model.image_newline.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.model.projector.parameters())
    assert all(p.grad is None for p in model.model.vision_tower.parameters())
    model.zero_grad(set_to_none=True)


def test_microbatch_split_and_padding_keep_each_samples_image_sizes(model):
    batch = tiled_batch_for(model, SIZES, 160, seed=3)
    mbs = split_microbatches(batch, 2)
    assert mbs[0]["image_sizes"].tolist() == [list(s) for row in SIZES[:2] for s in row]
    assert mbs[1]["image_sizes"].tolist() == [list(s) for row in SIZES[2:] for s in row]
    whole = _per_token(model, batch)
    for i, mb in enumerate(mbs):
        torch.testing.assert_close(_per_token(model, mb), whole[2 * i:2 * i + 2], atol=ATOL, rtol=0)
    padded = pad_to_microbatches(mbs[0], 3)  # a 3rd row copies row 2 and its two images, with no loss
    assert padded["image_sizes"].tolist() == [[40, 90], [90, 40], [32, 32], [90, 40], [32, 32]]
    assert padded["loss_mask"][2].sum() == 0
    torch.testing.assert_close(_per_token(model, padded)[2], whole[1], atol=ATOL, rtol=0)


def test_layout_errors_are_one_line(model):
    batch = tiled_batch_for(model, SIZES, 160, seed=4)
    swapped = dict(batch, image_sizes=batch["image_sizes"].flip(0))
    with pytest.raises(ImageTokenMismatch, match="sample 0 of the batch has .* tokens by image size"):
        _per_token(model, swapped)
    with pytest.raises(ImageTokenMismatch, match="needs image_sizes"):
        _per_token(model, dict(batch, image_sizes=None))
    with pytest.raises(ImageTokenMismatch, match="tiled model takes images"):
        _per_token(model, dict(batch, images=batch["images"][:, 0]))
    with pytest.raises(ValueError, match="needs the PIL images"):
        model.generate([True], ["<image> hi"])


@pytest.fixture(scope="module")
def json_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiled_data")
    (root / "images").mkdir()
    g = torch.Generator().manual_seed(5)
    records = []
    for i, (h, w) in enumerate([(40, 90), (90, 40), (64, 64)]):
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / "images" / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"a picture of {h} by {w} pixels"}]})
    (root / "data.json").write_text(json.dumps(records))
    return root


def _dataset(model, root):
    return NevaDataset(str(root / "data.json"), model.processor,
                       DatasetSettings(SEQ, "plain", image_folder=str(root / "images")))


def test_dataset_counts_tiles_and_sizes_come_from_each_image(model, json_data):
    ds = _dataset(model, json_data)
    items = [ds[i] for i in range(len(ds))]
    for it in items:
        img = Image.open(json_data / "images" / f"{it['id'][1:]}.png")
        assert int((it["input_ids"] == model.image_token_id).sum()) == model.image_token_count(img)
        assert it["image_sizes"].tolist() == [[img.height, img.width]]
        assert torch.equal(it["images"][0], model.preprocess_images(img.convert("RGB")))
    batch = NevaCollator(model.tokenizer.pad_token_id)(items)
    assert batch["images"].shape == (3, model.tiling.max_tiles, 3, 32, 32)
    assert batch["image_sizes"].tolist() == [[40, 90], [90, 40], [64, 64]]
    loss, tokens = model.loss_from_batch(batch)
    assert torch.isfinite(loss) and tokens > 0


def test_packed_rows_give_the_unpacked_loss(model, json_data):
    ds = _dataset(model, json_data)
    items = [ds[i] for i in range(len(ds))]
    flat = NevaCollator(model.tokenizer.pad_token_id)(items)
    packed = PackedCollator(model.tokenizer.pad_token_id, seq_length=SEQ)([[items[0], items[2]], [items[1]]])
    assert packed["image_sizes"].tolist() == [[40, 90], [64, 64], [90, 40]]
    with torch.no_grad():
        (l_flat, n_flat), (l_packed, n_packed) = model.loss_from_batch(flat), model.loss_from_batch(packed)
    assert int(n_flat) == int(n_packed)
    torch.testing.assert_close(l_packed, l_flat, atol=ATOL, rtol=0)


def test_a_sample_with_two_tiled_images_of_different_sizes(model, json_data, tmp_path):
    """Several images per sample and tiling together: each tag's run has its own image's count, the item keeps
    both sizes in tag order, and the sample's loss equals the loss of its rows with the images in that order."""
    rec = {"id": "pair", "image": ["0.png", "1.png"], "conversations": [
        {"from": "human", "value": "<image> then <image>"}, {"from": "gpt", "value": "two pictures"}]}
    path = tmp_path / "pair.json"
    path.write_text(json.dumps([rec]))
    ds = NevaDataset(str(path), model.processor,
                     DatasetSettings(SEQ, "vicuna_v1", image_folder=str(json_data / "images")))
    it = ds[0]
    imgs = [Image.open(json_data / "images" / f"{i}.png") for i in (0, 1)]
    assert it["image_sizes"].tolist() == [[im.height, im.width] for im in imgs]
    runs = [len(list(g)) for is_image, g in itertools.groupby(it["input_ids"].tolist(),
                                                               key=lambda t: t == model.image_token_id) if is_image]
    assert runs == [model.image_token_count(im) for im in imgs]  # two runs, each its own image's count
    assert runs[0] != runs[1]  # 40x90 and 90x40 tile differently, so the order is checked
    batch = NevaCollator(model.tokenizer.pad_token_id)([it])
    assert batch["num_images"].tolist() == [2] and batch["image_sizes"].tolist() == it["image_sizes"].tolist()
    loss, tokens = model.loss_from_batch(batch)
    assert torch.isfinite(loss) and tokens > 0


def test_tar_shards_and_energon_give_the_json_batch(model, json_data, tmp_path):
    """The model's data setup streams tiled images from tar shards and Energon (once refused): the same records
    give the JSON path's batch (placeholder counts, pixels, image_sizes) and loss."""
    require("megatron.energon")
    from omegaconf import OmegaConf

    from nemo_neva.data.energon import EnergonSource
    from nemo_neva.data.shards import ShardedNevaDataset
    from scripts.convert_llava_to_energon import convert

    out = str(tmp_path / "energon")  # Energon's folder is also a shard folder (convert_to_shards wrote it)
    convert(str(json_data / "data.json"), str(json_data / "images"), out, samples_per_shard=10, workers=1)
    cfg = OmegaConf.merge(OmegaConf.to_container(model.cfg.data),
                          {"conv_template": "plain", "image_folder": str(json_data / "images"),
                           "energon_val_split": "train", "shuffle_buffer": 1})
    ref = model.build_dataset(cfg, str(json_data / "data.json"))
    pos = {r["id"]: k for k, r in enumerate(ref.records)}
    shards, energon = model.build_dataset(cfg, os.path.join(out, "index.json")), model.build_dataset(cfg, out)
    assert isinstance(shards, ShardedNevaDataset) and isinstance(energon, EnergonSource)
    collate = NevaCollator(model.tokenizer.pad_token_id)
    shards.shuffle = False
    for got in (collate(list(shards)), next(iter(energon.loader(batch_size=3, training=False)))):
        want = collate([ref[pos[i]] for i in got["ids"]])
        for key in ("tokens", "labels", "loss_mask", "num_images", "images", "image_sizes"):
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
        with torch.no_grad():  # same inputs, same kernels: the same loss, bit for bit
            torch.testing.assert_close(model.loss_from_batch(got)[0], model.loss_from_batch(want)[0], rtol=0,
                                       atol=0)
