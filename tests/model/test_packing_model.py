"""Packed rows give every sample the same per-token losses as running it alone (CPU attention mask path)."""
import pytest
import torch

from nemo_neva import MegatronNevaModel
from nemo_neva.data.collate import NevaCollator
from nemo_neva.data.packing import PackedCollator, first_fit_decreasing
from tests.model.helpers import ROOT, llama_overrides, tiny_model_cfg


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_packed_per_sample_losses_equal_unpacked(style):
    overrides = llama_overrides() if style == "llama" else {}
    cfg = tiny_model_cfg(**overrides, **{
        "data.data_path": f"{ROOT}/data/shapes_demo/stage2_instruct.json", "data.conv_template": "vicuna_v1",
        "encoder_seq_length": 256, "data.seq_length": 256})
    model = MegatronNevaModel(cfg)
    model.eval()
    dataset = model.build_dataset(cfg.data)
    items = [dataset[i] for i in range(6)]
    assert all(it is not None for it in items)
    bins = first_fit_decreasing([len(it["input_ids"]) - 1 for it in items], 256)
    assert len(bins) < len(items)  # several samples really share a row
    packed = PackedCollator(model.tokenizer.pad_token_id, seq_length=256)([[items[i] for i in b] for b in bins])

    def per_token(batch):
        with torch.no_grad():
            return model.model(batch["tokens"], batch["position_ids"], attention_mask=batch.get("attention_mask"),
                               images=batch["images"], labels=batch["labels"], num_images=batch["num_images"])

    packed_loss = per_token(packed)
    for row, members in enumerate(bins):
        for seg, idx in enumerate(members):
            alone = NevaCollator(model.tokenizer.pad_token_id)([items[idx]])
            ref = per_token(alone)[0][alone["loss_mask"][0] > 0]
            sel = (packed["segment_ids"][row] == seg) & (packed["loss_mask"][row] > 0)
            assert torch.allclose(packed_loss[row][sel], ref, atol=1e-4), (style, idx)
