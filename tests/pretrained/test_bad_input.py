"""Bad pretrained-LM input stops with one clear line before anything is built or written."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nemo_neva import build_model
from tests.pretrained.lm_helpers import ROOT, make_tiny_lm, neva_cfg


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lm") / "llama")
    make_tiny_lm("llama", path)
    return path


def _copy(src, tmp_path, name="lm", **config_changes):
    path = str(tmp_path / name)
    shutil.copytree(src, path)
    if config_changes:
        cfg_path = os.path.join(path, "config.json")
        cfg = json.load(open(cfg_path))
        cfg.update(config_changes)
        json.dump(cfg, open(cfg_path, "w"))
    return path


def _error(cfg, kind=(ValueError, FileNotFoundError)):
    with pytest.raises(kind) as err:
        build_model(cfg)
    message = str(err.value)
    assert "\n" not in message  # one line
    return message


def test_sharded_checkpoint_loads_and_a_missing_shard_is_named(tmp_path):
    from transformers import AutoModelForCausalLM

    path = str(tmp_path / "sharded")
    hf = make_tiny_lm("llama", str(tmp_path / "one"))
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "one")).save_pretrained(path, max_shard_size="60KB")
    shutil.copy(os.path.join(tmp_path, "one", "tokenizer.json"), path)
    shutil.copy(os.path.join(tmp_path, "one", "tokenizer_config.json"), path)
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 2
    model = build_model(neva_cfg(path))  # streamed from every shard
    assert torch.equal(model.model.language_model.decoder.final_layernorm.weight, hf.model.norm.weight)
    os.remove(os.path.join(path, shards[1]))
    assert shards[1] in _error(neva_cfg(path), FileNotFoundError)


def test_unknown_architecture_is_named(llama, tmp_path):
    path = _copy(llama, tmp_path, architectures=["FalconForCausalLM"])
    assert "architecture FalconForCausalLM is not supported" in _error(neva_cfg(path))


def test_sliding_window_is_refused(tmp_path):
    path = str(tmp_path / "mistral")
    make_tiny_lm("mistral", path, sliding_window=16)
    assert "sliding_window=16" in _error(neva_cfg(path))


def test_rope_scaling_type_mcore_cannot_express_is_named(llama, tmp_path):
    path = _copy(llama, tmp_path, rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 2.0})
    assert "rope_type='yarn'" in _error(neva_cfg(path))


def test_contradicting_override_names_both_values(llama):
    msg = _error(neva_cfg(llama, num_layers=3, hidden_size=64))  # hidden_size agrees: fine
    assert "model.num_layers=3" in msg and "num_layers=2" in msg


def test_tokenizer_larger_than_the_vocabulary(llama, tmp_path):
    path = _copy(llama, tmp_path, vocab_size=300)
    assert "has 400 tokens" in _error(neva_cfg(path)) and "300" in _error(neva_cfg(path))


def test_heads_not_divisible_by_tp_name_the_sizes_that_work(tmp_path):
    path = str(tmp_path / "nine_heads")  # SmolLM2's 9 heads / 3 KV groups
    make_tiny_lm("llama", path, hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8)
    msg = _error(neva_cfg(path, tensor_model_parallel_size=2))
    assert "tensor_model_parallel_size=2" in msg and "TP sizes that work: 1, 3" in msg


def test_config_weights_shape_mismatch(llama, tmp_path):
    path = _copy(llama, tmp_path, intermediate_size=128)
    msg = _error(neva_cfg(path))
    assert "gate_proj.weight" in msg and "(96, 64)" in msg and "(128, 64)" in msg


def test_pickle_only_weights_need_trust(llama, tmp_path):
    from safetensors.torch import load_file

    path = _copy(llama, tmp_path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save(tensors, os.path.join(path, "pytorch_model.bin"))
    assert "pickle" in _error(neva_cfg(path)) and "trust_pickle" in _error(neva_cfg(path))
    model = build_model(neva_cfg(path, **{"mm_cfg.llm.trust_pickle": True}))
    assert torch.equal(model.model.language_model.decoder.final_layernorm.weight, tensors["model.norm.weight"])


def test_pretrain_script_stops_with_one_line_and_writes_no_nemo(llama, tmp_path):
    path = _copy(llama, tmp_path, architectures=["FalconForCausalLM"])
    exp = tmp_path / "exp"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "neva_pretrain.py"),
                           f"model.mm_cfg.llm.from_pretrained={path}", "trainer.max_steps=1",
                           f"exp_manager.exp_dir={exp}"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "FalconForCausalLM" in errors[0] and "Traceback" not in proc.stderr
    assert not list(exp.rglob("*.nemo"))
