"""scripts/export_to_trtllm.py end to end from a saved .nemo, in its own process (FP8, TP=2, --build)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.export import trtllm_reference as ref
from tests.export.trtllm_helpers import image_batch, model_logits, tiny_neva
from tests.model.helpers import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "export_to_trtllm.py")
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_neva("llama", seed=6)
    path = str(tmp_path_factory.mktemp("nemo") / "tiny.nemo")
    model.save_to(path)
    return model, path


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600, env=ENV)


def test_script_writes_the_export_folder_and_reports_skipped_builds(saved, tmp_path):
    model, nemo = saved
    out = str(tmp_path / "out")
    proc = _run("--nemo-path", nemo, "--output-dir", out, "--tp-size", "2", "--dtype", "float32", "--build")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rel in ("llm/config.json", "llm/rank0.safetensors", "llm/rank1.safetensors", "vision/vision_encoder.onnx",
                "vision/preprocessor_config.json", "tokenizer/tokenizer_config.json", "nemo_neva_export.json"):
        assert os.path.isfile(os.path.join(out, rel)), rel
    meta = json.load(open(os.path.join(out, "nemo_neva_export.json")))
    assert (meta["image_token_id"], meta["tokens_per_image"], meta["vocab_size"]) == (
        model.image_token_id, model.tokens_per_image, len(model.tokenizer))
    assert meta["conv_template"] == model.cfg.data.conv_template and meta["image_tag"] in meta["prompt_example"]
    assert model.tokenizer.eos_token_id in meta["stop_token_ids"]
    if shutil.which("trtllm-build") is None and importlib.util.find_spec("tensorrt_llm") is None:
        assert "skipped LLM engine" in proc.stdout and "--max_prompt_embedding_table_size 16" in proc.stdout
    if importlib.util.find_spec("tensorrt") is None and shutil.which("trtexec") is None:
        assert "skipped vision engine" in proc.stdout
    # the files written from the restored .nemo reproduce the in-memory model's logits
    cfg, ranks = ref.load_checkpoint(os.path.join(out, "llm"))
    ids, pixels = image_batch(model, rows=1)
    from nemo_neva.export.trtllm_prompt import fake_prompt_ids, prompt_table

    with torch.no_grad():
        table = prompt_table(model.model.encode_images(pixels))
    theirs = ref.forward(cfg, ranks, fake_prompt_ids(ids, meta["image_token_id"], meta["vocab_size"]), table)
    # fp32: the reference runner (tests/export/trtllm_reference.py) computes the LM from the rank files with its
    # own ops and op order; a misplaced tensor moves these O(1) logits by > 1e-2, rounding stays near 1e-6
    assert (theirs - model_logits(model, ids, pixels)).abs().max() < 2e-5


@pytest.mark.slow  # FP8 itself is tested in-process (test_trtllm_fp8.py); this is the CLI default calibration
def test_script_fp8_uses_the_training_data_for_calibration(saved, tmp_path):
    _, nemo = saved
    out = str(tmp_path / "fp8")
    proc = _run("--nemo-path", nemo, "--output-dir", out, "--fp8", "--calib-samples", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.load(open(os.path.join(out, "nemo_neva_export.json")))
    assert meta["quantization"]["quant_algo"] == "FP8" and meta["fp8_calibration"]["samples"] == 2
    assert meta["fp8_calibration"]["data_path"].endswith("stage1_captions.json")


def test_script_refuses_bad_input_with_a_message(saved, tmp_path):
    _, nemo = saved
    proc = _run("--nemo-path", nemo, "--output-dir", str(tmp_path / "x"), "--tp-size", "3")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last == "error: --tp-size 3 must divide num_attention_heads=4", proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "x")


def test_missing_calibration_file_is_refused_before_the_restore(saved, tmp_path):
    from nemo_neva.export.trtllm import export_nemo_to_trtllm

    _, nemo = saved
    with pytest.raises(FileNotFoundError, match="--calib-data /nonexistent.json: no such file"):
        export_nemo_to_trtllm(nemo, str(tmp_path / "x"), fp8_enabled=True, calib_data="/nonexistent.json")
