"""Hugging Face LLaVA <-> .nemo: transformers' LlavaForConditionalGeneration is the oracle.

A tiny random HF LLaVA (CLIP tower, LLaMA LM) is written with save_pretrained, converted to a .nemo and
restored; logits on the same input_ids + pixel_values must match transformers' in fp32, and exporting
back must reproduce every tensor bit for bit.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nemo_neva import MegatronNevaModel
from nemo_neva.export.hf import convert_hf_to_nemo, export_neva_to_hf, export_nemo_to_hf, read_hf_weights
from tests.export.hf_helpers import (ROOT, TOKENS_PER_IMAGE, hf_logits, make_tiny_llava, neva_logits,
                                     probe_inputs)

# fp32 logits (~2 in size) of transformers and megatron-core: measured 0.0 (bit-identical) at OMP_NUM_THREADS=1 on
# this CPU. Fused qkv / fc1 matmuls there, separate projections here: another BLAS or thread count may group the
# dot products differently (~1e-7 relative per matmul); 1e-4 is far below a wrong weight's effect (~1e-2).
ATOL = 1e-4
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def _hf_model(path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=[{"num_kv_heads": 2}, {"num_kv_heads": 4, "tie": True},
                                        {"num_kv_heads": 2, "tower": "siglip"}, {"num_kv_heads": 2, "lm": "mistral"}],
                ids=["gqa", "mha_tied", "siglip", "mistral"])
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    hf_dir = str(root / "hf")
    make_tiny_llava(hf_dir, **request.param)
    nemo = str(root / "model.nemo")
    if request.param == {"num_kv_heads": 2}:  # one variant goes through the script in its own process
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_hf_llava_to_nemo.py"),
                               "--input-dir", hf_dir, "--output-path", nemo], capture_output=True, text=True,
                              timeout=600, env=ENV)
        assert proc.returncode == 0, proc.stderr[-4000:]
    else:
        convert_hf_to_nemo(hf_dir, nemo)
    model = MegatronNevaModel.restore_from(nemo)
    return root, hf_dir, nemo, model


def test_nemo_logits_match_transformers(converted):
    _, hf_dir, _, model = converted
    hf = _hf_model(hf_dir)
    assert model.tokens_per_image == TOKENS_PER_IMAGE
    ids, pixels = probe_inputs(model.image_token_id, len(model.tokenizer))
    ours, theirs = neva_logits(model, ids, pixels), hf_logits(hf, ids, pixels)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_nemo_config_is_llama_style_and_keeps_hf_processor(converted):
    _, hf_dir, _, model = converted
    cfg = model.cfg
    hf_cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    assert (cfg.position_embedding_type, cfg.normalization, cfg.activation, cfg.bias) == ("rope", "RMSNorm",
                                                                                         "swiglu", False)
    assert cfg.num_query_groups == hf_cfg["text_config"]["num_key_value_heads"]
    assert cfg.rotary_base == 5000.0 and cfg.mm_cfg.mm_mlp_adapter_type == "mlp2x_gelu"
    assert cfg.mm_cfg.vision_encoder.vision_select_layer == -2
    assert cfg.mm_cfg.vision_encoder.drop_cls == (hf_cfg["vision_feature_select_strategy"] == "default")
    assert cfg.mm_cfg.vision_encoder.model_type == hf_cfg["vision_config"]["model_type"].split("_")[0]
    assert cfg.share_embeddings_and_output_weights == hf_cfg["text_config"]["tie_word_embeddings"]
    # the padded vocabulary (576 -> 640) is megatron's; the HF size is kept for export
    assert model.model.language_model.embedding.word_embeddings.weight.shape[0] == 640
    assert cfg.hf.vocab_size == 576
    kind = hf_cfg["vision_config"]["model_type"].split("_")[0]
    assert type(model.image_processor).__name__.lower().startswith(kind + "imageprocessor")


@pytest.fixture(scope="module")
def exported(converted):
    root, hf_dir, nemo, _ = converted
    out = str(root / "exported")
    export_nemo_to_hf(nemo, out)
    return hf_dir, out


def test_roundtrip_reproduces_every_tensor(exported):
    src, out = exported
    # the export writes the Hub layout (vision tower under vision_model., as llava-hf checkpoints and the engines
    # have it), transformers 5's save_pretrained another spelling: the same tensors under canonical names
    raw = load_file(os.path.join(out, "model.safetensors"))
    assert any(k.startswith("vision_tower.vision_model.") for k in raw)
    assert not any(k.startswith(("vision_tower.embeddings", "model.")) for k in raw)
    a, b = read_hf_weights(src), read_hf_weights(out)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_exported_folder_loads_in_transformers_and_matches(exported, converted):
    from PIL import Image
    from transformers import AutoProcessor

    _, out = exported
    model = converted[3]
    hf = _hf_model(out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["image_seq_length"] == TOKENS_PER_IMAGE and cfg["image_token_index"] == model.image_token_id
    src_cfg = json.load(open(os.path.join(converted[1], "config.json")))
    assert cfg["vision_feature_select_strategy"] == src_cfg["vision_feature_select_strategy"]
    assert cfg["text_config"]["model_type"] == src_cfg["text_config"]["model_type"]
    ids, pixels = probe_inputs(model.image_token_id, len(model.tokenizer), seed=7)
    torch.testing.assert_close(hf_logits(hf, ids, pixels), neva_logits(model, ids, pixels), atol=ATOL, rtol=0)

    processor = AutoProcessor.from_pretrained(out)
    batch = processor(images=Image.new("RGB", (48, 40), (200, 30, 30)), text="<image>\nWhat colour?",
                      return_tensors="pt")
    assert int((batch["input_ids"] == model.image_token_id).sum()) == TOKENS_PER_IMAGE
    assert tuple(batch["pixel_values"].shape) == (1, 3, 32, 32)
    with torch.no_grad():
        theirs = hf(**batch).logits
    torch.testing.assert_close(neva_logits(model, batch["input_ids"], batch["pixel_values"]), theirs,
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("converted", [{"num_kv_heads": 2}], indirect=True, ids=["gqa"])
def test_export_from_tp2_nemo_matches_tp1(exported, converted):
    from nemo_neva.parallel.init import free_port

    root, _, nemo, _ = converted
    _, tp1_dir = exported
    out = str(root / "tp2")
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", os.path.join(ROOT, "tests", "model", "parallel_worker.py"),
           "--nemo", nemo, "--out", out, "--tp", "2", "--steps", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tp2_nemo = os.path.join(out, "trained.nemo")
    assert MegatronNevaModel.restore_from(tp2_nemo, return_config=True).tensor_model_parallel_size == 2
    hf_out = os.path.join(out, "hf")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "export_to_hf.py"), "--nemo-path",
                           tp2_nemo, "--output-dir", hf_out], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = load_file(os.path.join(tp1_dir, "model.safetensors")), load_file(os.path.join(hf_out, "model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bf16_checkpoint_goes_back_to_bf16_bit_for_bit(tmp_path):
    from nemo_neva.export.hf import load_hf_llava_into_neva

    src = str(tmp_path / "bf16")
    make_tiny_llava(src, dtype=torch.bfloat16)
    model = load_hf_llava_into_neva(src)  # computes in fp32; bf16 -> fp32 is exact
    assert model.cfg.hf.dtype == "bfloat16"
    out = str(tmp_path / "out")
    export_neva_to_hf(model, out)
    a, b = read_hf_weights(src), read_hf_weights(out)
    assert sorted(a) == sorted(b)
    for key in a:
        assert b[key].dtype == torch.bfloat16 and torch.equal(a[key], b[key]), key
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    ids, pixels = probe_inputs(model.image_token_id, len(model.tokenizer))  # the export runs as the .nemo does
    torch.testing.assert_close(hf_logits(_hf_model(out), ids, pixels), neva_logits(model, ids, pixels),
                               rtol=0, atol=ATOL)
