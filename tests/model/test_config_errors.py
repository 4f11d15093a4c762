"""Wrong configs fail early with a message that says what to change."""
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import open_dict

from nemo_neva import build_model
from nemo_neva.modules.language_model import build_transformer_config
from tests.model.helpers import ROOT, tiny_model_cfg


def test_missing_tokenizer_dir():
    with pytest.raises(FileNotFoundError, match="model.tokenizer.path"):
        build_model(tiny_model_cfg(**{"tokenizer.path": "/nonexistent/tok"}))


def test_query_groups_must_divide_heads():
    with pytest.raises(ValueError, match="num_query_groups"):
        build_model(tiny_model_cfg(num_query_groups=3))


def test_heads_not_divisible_by_tp_names_the_fix():
    cfg = tiny_model_cfg(num_attention_heads=3, hidden_size=48, tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match="not divisible by model.tensor_model_parallel_size=2"):
        build_transformer_config(cfg, torch.float32)


def test_unknown_vision_tower_and_bad_select_layer():
    with pytest.raises(ValueError, match="model_type"):
        build_model(tiny_model_cfg(**{"mm_cfg.vision_encoder.model_type": "resnet"}))
    with pytest.raises(ValueError, match="vision_select_layer"):
        build_model(tiny_model_cfg(**{"mm_cfg.vision_encoder.vision_select_layer": 7}))


def test_transformer_engine_requested_without_te_is_explained():
    with pytest.raises(RuntimeError, match="transformer_engine"):
        build_model(tiny_model_cfg(transformer_engine=True))


def _run_example(script, *overrides, tmp_path):
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", script),
                           f"exp_manager.exp_dir={tmp_path}", *overrides],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=300)


def test_pretrain_with_missing_image_folder_fails_cleanly(tmp_path):
    proc = _run_example("neva_pretrain.py", "model.data.image_folder=/nonexistent/images", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error:" in proc.stderr and "/nonexistent/images" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_finetune_without_pretrained_nemo_fails_cleanly(tmp_path):
    proc = _run_example("neva_finetune.py", "model.restore_from_path=/nonexistent/x.nemo", tmp_path=tmp_path)
    assert proc.returncode != 0 and "no such .nemo file" in proc.stderr
    assert "Traceback" not in proc.stderr
