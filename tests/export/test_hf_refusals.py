"""What the HF interchange refuses, and that it says why (pickle weights, non-LLaMA LMs, projectors)."""
import importlib.util
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from nemo_neva import build_model
from nemo_neva.export.hf import UnsupportedCheckpoint, check_hf_config, export_neva_to_hf, read_hf_weights
from tests.export.hf_helpers import ROOT, make_tiny_llava
from tests.model.helpers import llama_overrides, tiny_model_cfg


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf") / "tiny")
    make_tiny_llava(path)
    return path


@pytest.fixture
def bin_only(hf_dir, tmp_path):
    path = str(tmp_path / "bin_only")
    shutil.copytree(hf_dir, path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save(tensors, os.path.join(path, "pytorch_model.bin"))
    return path, tensors


def test_pickle_only_checkpoint_is_refused_without_trust_pickle(bin_only, tmp_path, capsys):
    path, _ = bin_only
    out = str(tmp_path / "x.nemo")
    assert _script("convert_hf_llava_to_nemo")(["--input-dir", path, "--output-path", out]) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "--trust-pickle" in err and "pytorch_model.bin" in err
    assert not os.path.exists(out)
    with pytest.raises(UnsupportedCheckpoint, match="--trust-pickle"):
        read_hf_weights(path)


def test_trust_pickle_reads_the_same_tensors_and_converts(bin_only, tmp_path):
    path, tensors = bin_only
    loaded = read_hf_weights(path, trust_pickle=True)
    assert sorted(loaded) == sorted(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    out = str(tmp_path / "x.nemo")
    assert _script("convert_hf_llava_to_nemo")(["--input-dir", path, "--output-path", out, "--trust-pickle"]) == 0
    assert os.path.isfile(out)


def _llava_config(**changes):
    from transformers import LlavaConfig

    text = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "vocab_size": 576}
    vision = {"model_type": "clip_vision_model", "hidden_size": 64, "num_attention_heads": 4,
              "intermediate_size": 128, "image_size": 32, "patch_size": 8}
    text.update(changes.pop("text", {}))
    vision.update(changes.pop("vision", {}))
    return LlavaConfig(text_config=text, vision_config=vision, **changes)


@pytest.mark.parametrize("changes, message", [
    ({"text": {"model_type": "qwen2"}}, "language model type 'qwen2'"),
    ({"text": {"model_type": "gpt2"}}, "language model type 'gpt2'"),
    ({"vision": {"model_type": "dinov2"}}, "vision tower type 'dinov2'"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act 'relu'"),
    ({"vision_feature_layer": [-2, -5]}, "vision_feature_layer"),
    ({"text": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}}}, "RoPE scaling 'llama3'"),
    ({"text": {"attention_bias": True}}, "attention_bias"),
], ids=["qwen2", "gpt2", "dinov2", "relu_projector", "multi_layer", "rope_scaling", "qkv_bias"])
def test_unsupported_hf_configs_are_refused(changes, message):
    with pytest.raises(UnsupportedCheckpoint, match=message.replace("[", r"\[")):
        check_hf_config(_llava_config(**changes))


def test_convert_script_names_the_unsupported_lm(hf_dir, tmp_path, capsys):
    path = str(tmp_path / "qwen2_lm")
    shutil.copytree(hf_dir, path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["text_config"]["model_type"] = "qwen2"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    assert _script("convert_hf_llava_to_nemo")(["--input-dir", path, "--output-path", str(tmp_path / "x.nemo")]) == 2
    assert "language model type 'qwen2' is not supported" in capsys.readouterr().err


@pytest.mark.parametrize("adapter", ["linear", "mlp3x_gelu"])
def test_projector_hf_cannot_express_is_refused_on_export(adapter, tmp_path):
    model = build_model(tiny_model_cfg(**llama_overrides(), **{"mm_cfg.mm_mlp_adapter_type": adapter}))
    out = str(tmp_path / "hf")
    with pytest.raises(UnsupportedCheckpoint, match=f"mm_mlp_adapter_type='{adapter}'.*mlp2x_gelu"):
        export_neva_to_hf(model, out)
    assert not os.path.exists(out)


def test_export_script_refuses_an_lm_no_family_expresses(tmp_path, capsys):
    nemo = str(tmp_path / "mixed.nemo")
    # GPT style (LayerNorm, gelu, biases) but RoPE: neither HF GPT-2 nor HF LLaMA computes it
    build_model(tiny_model_cfg(position_embedding_type="rope")).save_to(nemo)
    out = str(tmp_path / "hf")
    assert _script("export_to_hf")(["--nemo-path", nemo, "--output-dir", out]) == 2
    err = capsys.readouterr().err
    assert "nearest gpt2: position_embedding_type='rope'" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["mixed.nemo"]  # no folder, no partial one


def test_siglip_with_default_strategy_is_refused_because_hf_drops_a_real_patch(tmp_path):
    """HF's LLaVA drops the first feature under strategy "default" even for SigLIP, which has no CLS: it sees
    one image token fewer than NeVA's all-patch SigLIP tower. The converter refuses rather than shift tokens."""
    from transformers import LlavaForConditionalGeneration

    path = str(tmp_path / "siglip")
    make_tiny_llava(path, tower="siglip")
    hf = LlavaForConditionalGeneration.from_pretrained(path)
    config = hf.config
    config.vision_feature_select_strategy = "default"
    pixels = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        feats = hf.model.get_image_features(pixel_values=pixels, vision_feature_layer=config.vision_feature_layer,
                                            vision_feature_select_strategy="default")
    feats = getattr(feats, "pooler_output", feats)  # transformers 5: an output object, one tensor per image
    feats = feats[0] if isinstance(feats, (list, tuple)) else feats
    patches = (32 // 8) ** 2
    assert feats.reshape(-1, feats.shape[-1]).shape[0] == patches - 1  # HF: the first SigLIP patch is gone
    with pytest.raises(UnsupportedCheckpoint, match="SigLIP.*'full'"):
        check_hf_config(config)
    config.vision_feature_select_strategy = "full"
    check_hf_config(config)  # the supported SigLIP form
