"""FP8 Hugging Face export (ModelOpt format, hf_fp8.py): the files the engines' readers expect, FP8 weights within
E4M3 rounding of the fp32 export, and the folder's dequantised logits near the fp32 export's, with transformers'
LlavaForConditionalGeneration as the model that computes both. CPU only: no engine runs FP8 here."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from nemo_neva.export.hf import UnsupportedCheckpoint, export_neva_to_hf, export_neva_to_hf_fp8
from nemo_neva.export.hf_fp8 import FP8_MAX
from tests.export.trtllm_helpers import image_batch, tiny_neva
from tests.model.helpers import ROOT

DEMO = os.path.join(ROOT, "data", "shapes_demo")
CALIB = os.path.join(DEMO, "stage1_captions.json")
IMAGES = os.path.join(DEMO, "images")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    model = tiny_neva("llama", seed=4)
    root = tmp_path_factory.mktemp("hf_fp8")
    fp8 = export_neva_to_hf_fp8(model, str(root / "fp8"), CALIB, IMAGES, calib_samples=4)
    ref = export_neva_to_hf(model, str(root / "ref"), "float32")
    return model, fp8, ref


def _json(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def test_quant_config_is_what_the_engines_read(folders):
    _, fp8, _ = folders
    # hf_quant_config.json as ModelOpt writes it and vLLM's ModelOptFp8Config / TensorRT-LLM read it
    quant = _json(fp8, "hf_quant_config.json")
    assert set(quant) == {"producer", "quantization"}
    assert quant["producer"]["name"] == "modelopt"
    assert quant["quantization"]["quant_algo"] == "FP8"
    assert quant["quantization"]["kv_cache_quant_algo"] is None
    assert {"lm_head", "vision_tower*", "multi_modal_projector*"} <= set(quant["quantization"]["exclude_modules"])
    # config.json's quantization_config: ModelOpt's converted form, quant_method "modelopt"
    qc = _json(fp8, "config.json")["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "FP8"
    assert qc["ignore"] == quant["quantization"]["exclude_modules"]
    assert qc["producer"] == quant["producer"]
    group = qc["config_groups"]["group_0"]
    for side in ("weights", "input_activations"):
        assert group[side] == {"dynamic": False, "num_bits": 8, "type": "float"}


def test_tensors_fp8_where_the_engines_expect_it(folders):
    model, fp8, _ = folders
    t = load_file(os.path.join(fp8, "model.safetensors"))
    quantized = {k[: -len(".weight")] for k, v in t.items() if v.dtype == torch.float8_e4m3fn}
    want = {f"language_model.model.layers.{i}.{'self_attn' if n[0] in 'qkvo' else 'mlp'}.{n}"
            for i in range(model.cfg.num_layers) for n in LINEARS}
    assert quantized == want
    for p in want:
        for scale in ("weight_scale", "input_scale"):  # per-tensor float32 scalars
            s = t[f"{p}.{scale}"]
            assert s.dtype == torch.float32 and s.shape == () and float(s) > 0, (p, scale)
    scales = {k for k in t if k.endswith(("_scale",))}
    assert len(scales) == 2 * len(want)  # nothing outside the LM decoder's linears carries a scale
    rest = {k: v for k, v in t.items() if k not in scales and v.dtype != torch.float8_e4m3fn}
    assert all(v.dtype == torch.bfloat16 for v in rest.values())  # default dtype with --fp8
    assert any(k.startswith("vision_tower.vision_model.") for k in rest)
    assert "language_model.lm_head.weight" in rest and "multi_modal_projector.linear_1.weight" in rest
    # q/k/v read one input (so do gate/up): one calibrated scale each, which is what the engines' fused
    # qkv / gate_up linears take (their max) without requantizing activations
    for i in range(model.cfg.num_layers):
        a = f"language_model.model.layers.{i}."
        assert float(t[a + "self_attn.q_proj.input_scale"]) == float(t[a + "self_attn.k_proj.input_scale"]) \
            == float(t[a + "self_attn.v_proj.input_scale"])
        assert float(t[a + "mlp.gate_proj.input_scale"]) == float(t[a + "mlp.up_proj.input_scale"])


def test_dequantised_weights_within_e4m3_rounding(folders):
    _, fp8, ref = folders
    t = load_file(os.path.join(fp8, "model.safetensors"))
    r = load_file(os.path.join(ref, "model.safetensors"))
    worst = 0.0
    for key, q in t.items():
        if q.dtype != torch.float8_e4m3fn:
            continue
        w = r[key]
        scale = t[key[: -len("weight")] + "weight_scale"]
        assert float(scale) == pytest.approx(float(w.abs().max()) / FP8_MAX, rel=1e-6)  # fp32 division
        err = (q.float() * scale - w).abs()
        # E4M3 has 3 mantissa bits: round-to-nearest is off by at most 2^-4 relative for normal values
        # (|w / scale| >= 2^-6); subnormals have a fixed spacing of 2^-9, so at most 2^-10 * scale absolute
        bound = torch.maximum(w.abs() * 2.0 ** -4, scale * 2.0 ** -10)
        assert bool((err <= bound * (1 + 1e-6)).all()), key  # 1e-6: the fp32 multiply by the scale
        worst = max(worst, float((err / w.abs().clamp(min=1e-12))[w.abs() >= scale * 2.0 ** -6].max()))
    assert 2.0 ** -6 < worst <= 2.0 ** -4 * (1 + 1e-6)  # real rounding happened, within the bound
    for key, value in t.items():  # the rest: the fp32 export's tensors rounded to bf16
        if key in r and value.dtype != torch.float8_e4m3fn:
            assert torch.equal(value, r[key].to(torch.bfloat16)), key


def _dequantised_model(ref, fp8, tmp):
    """transformers' LLaVA loading the FP8 folder's tensors dequantised to fp32 (beside the fp32 export's config),
    with each quantized linear's input fake-quantized by its input_scale: what the engines' static per-tensor FP8
    GEMM computes, up to its accumulation order."""
    import shutil

    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    t = load_file(os.path.join(fp8, "model.safetensors"))
    deq, input_scales = {}, {}
    for key, value in t.items():
        if key.endswith("_scale"):
            continue
        if value.dtype == torch.float8_e4m3fn:
            prefix = key[: -len(".weight")]
            value = value.float() * t[prefix + ".weight_scale"]
            input_scales[prefix.replace("language_model.model.", "", 1)] = t[prefix + ".input_scale"]
        deq[key] = value.float()
    folder = os.path.join(tmp, "dequantised")
    os.makedirs(folder)
    shutil.copy(os.path.join(ref, "config.json"), folder)
    save_file(deq, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()

    def fake_quant(scale):
        def hook(_module, args):
            x = args[0]
            return ((x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale).to(x.dtype),
        return hook

    hooked = 0
    for name, module in model.named_modules():
        short = name.split("language_model.", 1)[-1]
        if "language_model." in name and short in input_scales:
            module.register_forward_pre_hook(fake_quant(input_scales[short]))
            hooked += 1
    return model, hooked


def test_dequantised_logits_near_the_fp32_export(folders, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model, fp8, ref = folders
    ids, pixels = image_batch(model, rows=2)
    ref_model = LlavaForConditionalGeneration.from_pretrained(ref, dtype=torch.float32).eval()
    deq_model, n_hooks = _dequantised_model(ref, fp8, str(tmp_path))
    assert n_hooks == 7 * model.cfg.num_layers
    with torch.no_grad():
        want = ref_model(input_ids=ids, pixel_values=pixels).logits
        got = deq_model(input_ids=ids, pixel_values=pixels).logits
    rel_rms = float((got - want).pow(2).mean().sqrt() / want.std())
    print(f"FP8 export: dequantised logits rel. RMS error {rel_rms:.4f}, max abs {float((got - want).abs().max()):.4f}"
          f" (logit std {float(want.std()):.3f})")
    # Measured 0.063 (seeded, so fixed): FP8 weights alone give 0.047, bf16 for everything alone 0.006, the
    # fake-quantized activations the rest; E4M3 rounds each weight / input by up to 2^-4, and this tiny random
    # model's near-noise weights carry that to the logits. A mis-scaled or mis-mapped tensor moves logits by the
    # order of their std (input scales 10x too small, measured: 0.71), so 0.08 (27% above the measurement)
    # still catches it.
    assert rel_rms < 0.08
    assert rel_rms > 1e-3  # the folder really is quantized


def test_refuses_dims_fp8_cannot_take_writing_nothing(tmp_path):
    model = tiny_neva("llama", **{"ffn_hidden_size": 200})
    with pytest.raises(UnsupportedCheckpoint, match=r"ffn_hidden_size=200 .*divisible by 16"):
        export_neva_to_hf_fp8(model, str(tmp_path / "out"), CALIB, IMAGES, calib_samples=1)
    assert os.listdir(tmp_path) == []


def test_refuses_float32_and_missing_calibration_data(tmp_path):
    model = tiny_neva("llama")
    with pytest.raises(UnsupportedCheckpoint, match="float32"):
        export_neva_to_hf_fp8(model, str(tmp_path / "out"), CALIB, IMAGES, dtype="float32")
    with pytest.raises(FileNotFoundError, match="calibration data"):
        export_neva_to_hf_fp8(model, str(tmp_path / "out"), str(tmp_path / "missing.json"))
    assert os.listdir(tmp_path) == []


def test_cli_refuses_fp8_without_calibration_data(tmp_path, capsys):
    from nemo_neva.commands.export_to_hf import main

    with pytest.raises(SystemExit) as exit_:
        main(["--nemo-path", str(tmp_path / "m.nemo"), "--output-dir", str(tmp_path / "out"), "--fp8"])
    assert exit_.value.code == 2
    assert "--fp8 needs --calib-data" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_refuses_a_gpt2_lm(tmp_path):
    model = tiny_neva("gpt")  # NeVA's GPT-style LM exports as HF GPT-2 (Conv1D [in, out] weights)
    with pytest.raises(UnsupportedCheckpoint, match="'gpt2'; FP8 export supports llama"):
        export_neva_to_hf_fp8(model, str(tmp_path / "out"), CALIB, IMAGES, calib_samples=1)
    assert os.listdir(tmp_path) == []


def test_cli_writes_the_fp8_folder_from_a_nemo(tmp_path):
    from nemo_neva.commands.export_to_hf import main

    nemo = str(tmp_path / "m.nemo")
    tiny_neva("llama").save_to(nemo)
    out = tmp_path / "out"
    assert main(["--nemo-path", nemo, "--output-dir", str(out), "--fp8", "--calib-data", CALIB,
                 "--calib-images", IMAGES, "--calib-samples", "2"]) == 0
    assert _json(str(out), "hf_quant_config.json")["quantization"]["quant_algo"] == "FP8"
    t = load_file(os.path.join(out, "model.safetensors"))
    assert t["language_model.model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
