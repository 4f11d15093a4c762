"""The HF vision tower: local pretrained weights, feature layer / CLS selection, SigLIP."""
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from nemo_neva import build_model
from nemo_neva.modules.vision import VisionTower, build_image_processor
from tests.model.helpers import batch_for, tiny_model_cfg

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(7)
    hf = CLIPVisionModel(CLIPVisionConfig(**TINY)).eval()
    hf.save_pretrained(path)
    build_image_processor(hf.config).save_pretrained(path)
    return str(path), hf


def test_local_pretrained_tower_loads_its_weights_and_selects_layer_minus_two(clip_dir):
    path, hf = clip_dir
    model = build_model(tiny_model_cfg(**{"mm_cfg.vision_encoder.from_pretrained": path}))
    tower = model.model.vision_tower
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tower.model.state_dict()[name], tensor), name
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert torch.equal(tower(pixels), expected)


def test_keeping_cls_adds_one_token():
    tower = VisionTower(CLIPVisionConfig(**TINY), drop_cls=False)
    assert tower.features_per_image == 17 and tower(torch.randn(1, 3, 32, 32)).shape[1] == 17


def test_siglip_tower_has_no_cls_and_trains_in_neva():
    cfg = tiny_model_cfg(**{"mm_cfg.vision_encoder.model_type": "siglip"})
    model = build_model(cfg)
    assert model.tokens_per_image == 16 and type(model.model.vision_tower.model).__name__ == "SiglipVisionModel"
    loss, _ = model.loss_from_batch(batch_for(model))
    loss.backward()
    assert all(p.grad is not None for p in model.model.projector.parameters())
