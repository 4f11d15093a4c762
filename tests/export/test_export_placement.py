"""Export inputs follow the model: its device and dtype (nemo_neva/export/placement.py).

The dtype half runs here on a bf16 model on CPU: the ONNX export, FP8 calibration and `trtllm_check`'s reference
inputs. The device half: every one of them goes through `placement.on_module`, shown below to move inputs to a
module's device with a module on the `meta` device (no CUDA here); end to end on CUDA it is step 1 of
scripts/trtllm_gpu_check.sh (not run in this suite).
"""
import os

import pytest
import torch

from nemo_neva.export import trtllm_fp8 as fp8
from nemo_neva.export.placement import on_module, placement
from nemo_neva.export.trtllm import export_neva_to_trtllm
from tests.export.trtllm_helpers import OnnxVision, tiny_neva
from tests.model.helpers import ROOT

DEMO = os.path.join(ROOT, "data", "shapes_demo")


def test_inputs_go_to_the_modules_device_and_floating_dtype():
    module = torch.nn.Linear(4, 4).to(torch.bfloat16)
    moved = on_module({"x": torch.ones(2, 4), "ids": torch.arange(3), "rows": [torch.zeros(1)], "n": 3}, module)
    assert moved["x"].dtype == torch.bfloat16 and moved["ids"].dtype == torch.long
    assert moved["rows"][0].dtype == torch.bfloat16 and moved["n"] == 3
    on_meta = torch.nn.Linear(4, 4, device="meta")
    assert placement(on_meta)[0].type == "meta"
    assert on_module(torch.ones(2, 4), on_meta).device.type == "meta"
    assert on_module(torch.arange(3), on_meta).device.type == "meta"


@pytest.fixture(scope="module")
def bf16_model():
    model = tiny_neva("llama", seed=6)
    model.model.to(torch.bfloat16)
    return model


def _dtypes(model):
    return {name: p.dtype for name, p in model.model.named_parameters()}


def test_bf16_model_export_check_and_calibration(bf16_model, tmp_path):
    from PIL import Image

    from nemo_neva.export.trtllm_check import engine_inputs

    model = bf16_model
    before = _dtypes(model)
    assert set(before.values()) == {torch.bfloat16}
    out = str(tmp_path / "out")
    meta = export_neva_to_trtllm(model, out, dtype="bfloat16")
    assert _dtypes(model) == before  # the ONNX export casts a copy to fp32, not the model's own tower
    image = Image.open(os.path.join(DEMO, "images", "eval_00000.png")).convert("RGB")
    got = engine_inputs(model, out, meta, image, "What is in the image?", OnnxVision(out, meta))
    assert got["ref_logits"].dtype == torch.float32 and got["ref_logits"].device.type == "cpu"
    assert torch.isfinite(got["ref_logits"]).all()
    # fp32 ONNX of the bf16 weights vs the bf16 model: bf16 activations (8 bits of mantissa, ~4e-3 relative per
    # op) through the tiny tower; under trtllm_check's own 5e-2 bound
    assert got["vis_err"] < 5e-2
    amax = fp8.calibrate_activation_amax(model, fp8.calibration_batches(
        model, os.path.join(DEMO, "stage1_captions.json"), os.path.join(DEMO, "images"), num_samples=2))
    assert amax and all(v.device.type == "cpu" and torch.isfinite(v) and v > 0 for v in amax.values())
