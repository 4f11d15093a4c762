"""FP8 export: float8_e4m3fn weights with per-tensor scaling factors (TensorRT-LLM FP8Linear names), activation
scales calibrated by running the model on the demo data, dequantisation within E4M3 rounding error."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from nemo_neva.export import trtllm_fp8 as fp8
from nemo_neva.export.trtllm import write_llm_checkpoint
from nemo_neva.export.trtllm_layout import merge_ranks, neva_to_trtllm
from nemo_neva.export.trtllm_prompt import fake_prompt_ids, prompt_table
from tests.export import trtllm_reference as ref
from tests.export.trtllm_helpers import image_batch, model_logits, tiny_neva
from tests.model.helpers import ROOT

DEMO = os.path.join(ROOT, "data", "shapes_demo")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_neva("llama", seed=4)
    batches = fp8.calibration_batches(model, os.path.join(DEMO, "stage1_captions.json"),
                                      os.path.join(DEMO, "images"), num_samples=3)
    amax = fp8.calibrate_activation_amax(model, batches)
    root = tmp_path_factory.mktemp("fp8")
    dirs = {tp: str(root / f"tp{tp}") for tp in (1, 2)}
    for tp, folder in dirs.items():
        write_llm_checkpoint(model, folder, tp_size=tp, dtype="bfloat16", act_amax=amax)
    return model, amax, dirs


def test_config_and_tensor_dtypes(exported):
    _, _, dirs = exported
    cfg = json.load(open(os.path.join(dirs[1], "config.json")))
    assert cfg["quantization"] == {"quant_algo": "FP8", "kv_cache_quant_algo": None}
    t = load_file(os.path.join(dirs[1], "rank0.safetensors"))
    prefixes = [f"transformer.layers.{i}.{n}" for i in range(2) for n in fp8.QUANTIZED]
    for p in prefixes:
        assert t[p + ".weight"].dtype == torch.float8_e4m3fn
        for s in ("weights_scaling_factor", "activation_scaling_factor"):
            assert t[f"{p}.{s}"].dtype == torch.float32 and t[f"{p}.{s}"].shape == (1,)
            assert 0 < float(t[f"{p}.{s}"]) < float("inf")
    quantized = {p + ".weight" for p in prefixes}
    for name, value in t.items():  # lm_head, embedding and norms stay in the checkpoint dtype
        if name not in quantized and not name.endswith("_scaling_factor"):
            assert value.dtype == torch.bfloat16, name
    # fc and gate read the same input, so they share the activation scale
    assert torch.equal(t["transformer.layers.0.mlp.fc.activation_scaling_factor"],
                       t["transformer.layers.0.mlp.gate.activation_scaling_factor"])


def test_dequantised_weights_within_fp8_error(exported):
    model, _, dirs = exported
    state = {k: v for k, v in model.model.state_dict().items()
             if torch.is_tensor(v) and k.startswith("language_model.")}
    full = neva_to_trtllm(state, model.cfg, len(model.tokenizer))
    t = load_file(os.path.join(dirs[1], "rank0.safetensors"))
    deq = fp8.dequantize(t)
    for p in fp8.quantized_prefixes(full):
        orig, back = full[p + ".weight"], deq[p + ".weight"]
        scale = float(t[p + ".weights_scaling_factor"])
        assert scale == pytest.approx(float(orig.abs().max()) / fp8.FP8_MAX)  # fp32 scale vs float64: 1e-6 rel
        # E4M3: 3 mantissa bits -> relative rounding error <= 2^-4; subnormals: absolute <= scale * 2^-10
        bound = orig.abs() * 2 ** -4 + scale * 2 ** -10
        assert bool(((back - orig).abs() <= bound + 1e-12).all()), p  # + 1e-12: the bound's own fp32 rounding
        assert not torch.equal(back, orig)  # it really was quantized


def test_activation_scales_are_calibrated_amax(exported):
    _, amax, dirs = exported
    t = load_file(os.path.join(dirs[1], "rank0.safetensors"))
    for p in ("transformer.layers.0.attention.qkv", "transformer.layers.1.mlp.proj"):
        # stored in fp32: approx's default 1e-6 relative covers that rounding
        assert float(t[p + ".activation_scaling_factor"]) == pytest.approx(float(amax[p]) / fp8.FP8_MAX)
    # RMSNorm output feeding qkv and the SwiGLU product feeding proj have different ranges
    assert float(amax["transformer.layers.0.attention.qkv"]) != float(amax["transformer.layers.0.mlp.proj"])


def test_fp8_tp2_rejoins_to_tp1_and_forward_stays_close(exported):
    model, _, dirs = exported
    cfg1, (tp1,) = ref.load_checkpoint(dirs[1])
    cfg2, ranks = ref.load_checkpoint(dirs[2])
    merged = merge_ranks(ranks, cfg2)
    for name, value in tp1.items():
        assert torch.equal(merged[name].view(torch.uint8), value.view(torch.uint8)), name
    ids, pixels = image_batch(model, rows=1)
    ours = model_logits(model, ids, pixels)
    with torch.no_grad():
        table = prompt_table(model.model.encode_images(pixels))
    theirs = ref.forward(cfg2, ranks, fake_prompt_ids(ids, model.image_token_id, cfg2["vocab_size"]), table)
    # FP8 weights (E4M3 rounding, up to 6% per weight) + bf16 for the rest: near the fp32 model, not equal.
    # A layout error gives errors of the order of the logits themselves.
    rel_rms = float((theirs - ours).pow(2).mean().sqrt() / ours.std())
    assert 1e-3 < rel_rms < 0.1
