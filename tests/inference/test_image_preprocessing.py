"""One image preprocessing for training and inference: `model.data.image_aspect_ratio` (square | pad | keep)
gives the same pixel values in the training dataset, in generation (so evaluation and serving, which go
through it) and in the exported TensorRT-LLM / ONNX metadata; it is recorded in the .nemo."""
import json

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image

from nemo_neva import MegatronNevaModel, build_model
from nemo_neva.data.image_io import preprocess
from nemo_neva.inference.generate import generate
from tests.model.helpers import tiny_model_cfg

MODES = ("square", "pad", "keep")


def wide_image(w=48, h=32, seed=0):
    """Non-square noise: the three modes give three different pixel tensors."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_model_cfg())


@pytest.fixture
def one_sample(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    wide_image().save(folder / "wide.png")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "w", "image": "wide.png", "conversations": [
        {"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "a wide picture"}]}]))
    return str(data), str(folder)


def _set_mode(model, mode):
    with open_dict(model.cfg):
        model.cfg.data.image_aspect_ratio = mode


@pytest.mark.parametrize("mode", MODES)
def test_generation_pixels_equal_training_pixels(model, one_sample, mode):
    _set_mode(model, mode)
    data_path, folder = one_sample
    with open_dict(model.cfg):
        model.cfg.data.data_path, model.cfg.data.image_folder = data_path, folder
    train_pixels = model.build_dataset(model.cfg.data)[0]["images"][0]
    image = Image.open(f"{folder}/wide.png").convert("RGB")
    assert torch.equal(model.processor.pixels(image)[0], train_pixels)  # [n_images, 3, H, W]
    assert torch.equal(model.preprocess_images(image), train_pixels)
    others = [preprocess(image, model.image_processor, m) for m in MODES if m != mode]
    assert not any(torch.equal(o, train_pixels) for o in others)  # the modes do differ on this image


def test_a_pad_models_answer_is_computed_from_padded_pixels(model, monkeypatch):
    _set_mode(model, "pad")
    image = wide_image(seed=1)
    seen = []
    encode = model.model.encode_images

    def spy(images):
        seen.append(images.detach().clone())
        return encode(images)

    monkeypatch.setattr(model.model, "encode_images", spy)
    answer = generate(model, [image], ["<image>\nWhat is it?"], max_new_tokens=3)
    padded = preprocess(image, model.image_processor, "pad")
    assert len(seen) == 1 and torch.equal(seen[0], padded.unsqueeze(0))
    # the same answer as from the padded pixels given directly, and the padding really is in the input:
    # the top band of a padded 48x32 image is the processor's mean colour (normalised to ~0)
    assert answer == generate(model, [padded], ["<image>\nWhat is it?"], max_new_tokens=3)
    # (< 0.03: the fill is the mean rounded to a byte, at most 0.5 / 255 / std ~ 0.007 once normalised)
    assert padded[:, :4].abs().max() < 0.03 and padded[:, 12:20].abs().max() > 0.5


def test_mode_is_recorded_in_the_nemo_and_an_old_nemo_restores_as_square(tmp_path):
    from nemo_neva.checkpoint import nemo_connector as save_restore  # noqa: F401  (the connector the restore uses)

    cfg = tiny_model_cfg(**{"data.image_aspect_ratio": "pad"})
    path = str(tmp_path / "pad.nemo")
    build_model(cfg).save_to(path)
    restored = MegatronNevaModel.restore_from(path)
    assert restored.image_aspect_ratio == "pad" and restored.cfg.data.image_aspect_ratio == "pad"
    # a .nemo written before the mode was recorded (no key) was trained with the default: square
    old_cfg = MegatronNevaModel.restore_from(path, return_config=True)
    with open_dict(old_cfg):
        del old_cfg.data["image_aspect_ratio"]
    old = MegatronNevaModel.restore_from(path, override_config_path=old_cfg)
    assert old.image_aspect_ratio == "square" and old.cfg.data.image_aspect_ratio == "square"
    with open_dict(old_cfg):
        old_cfg.data.image_aspect_ratio = "stretch"
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        MegatronNevaModel.restore_from(path, override_config_path=old_cfg)


def test_exports_record_the_mode_and_reproduce_the_pixels(tmp_path):
    import onnx

    from nemo_neva.export.trtllm import META_FILE, export_neva_to_trtllm, export_pixels

    model = build_model(tiny_model_cfg(**{"data.image_aspect_ratio": "pad"}))
    out = str(tmp_path / "trt")
    meta = export_neva_to_trtllm(model, out, dtype="float32")
    assert meta["image_aspect_ratio"] == "pad" and json.load(open(f"{out}/{META_FILE}"))["image_aspect_ratio"] == "pad"
    image = wide_image(seed=2)
    assert torch.equal(export_pixels(out, image)[0], model.preprocess_images(image))
    props = {p.key: p.value for p in onnx.load(f"{out}/{meta['vision_onnx']}").metadata_props}
    assert props["nemo_neva.image_aspect_ratio"] == "pad"
    assert props["nemo_neva.image_pad_colour"] == ",".join(str(c) for c in meta["image_pad_colour"])
    old = {k: v for k, v in meta.items() if k != "image_aspect_ratio"}
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        export_pixels(out, image, old)


@pytest.mark.parametrize("mode", MODES)
def test_hf_export_processor_makes_the_models_pixels(tmp_path, mode):
    from transformers import AutoProcessor

    from nemo_neva.export.hf import export_neva_to_hf
    from tests.model.helpers import llama_overrides

    model = build_model(tiny_model_cfg(**llama_overrides(), **{"data.image_aspect_ratio": mode}))
    out = str(tmp_path / "hf")
    export_neva_to_hf(model, out)
    image = wide_image(seed=3)
    theirs = AutoProcessor.from_pretrained(out)(images=image, text="<image>", return_tensors="pt")["pixel_values"]
    assert torch.equal(theirs[0], model.preprocess_images(image))


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_hf_import_generates_from_transformers_pixels(tmp_path, tower):
    """A converted HF LLaVA records the mode its own processor implies (CLIP: keep), so generation feeds it
    what transformers' processor would."""
    from transformers import AutoProcessor

    from nemo_neva.export.hf import convert_hf_to_nemo
    from tests.export.hf_helpers import make_tiny_llava

    hf_dir, nemo = str(tmp_path / "hf"), str(tmp_path / "m.nemo")
    make_tiny_llava(hf_dir, tower=tower)
    convert_hf_to_nemo(hf_dir, nemo)
    model = MegatronNevaModel.restore_from(nemo)
    assert model.image_aspect_ratio == {"clip": "keep", "siglip": "square"}[tower]
    image = wide_image(seed=4)
    theirs = AutoProcessor.from_pretrained(hf_dir)(images=image, text="<image>", return_tensors="pt")["pixel_values"]
    assert torch.equal(model.processor.pixels(image)[0], theirs[0])
