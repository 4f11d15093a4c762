"""The user-facing scripts, run as a user runs them: pretrain -> finetune -> generate."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from nemo_neva import MegatronNevaModel
from tests.model.helpers import ROOT


def _run(script, *args, cwd):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], cwd=str(cwd),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def _state(path):
    model = MegatronNevaModel.restore_from(path)
    return model, {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    exp = tmp_path_factory.mktemp("exp")
    _run("neva_pretrain.py", "trainer.max_steps=3", f"exp_manager.exp_dir={exp}", cwd=exp)
    pre = exp / "neva_pretrain" / "neva_pretrain.nemo"
    _run("neva_finetune.py", "trainer.max_steps=3", f"exp_manager.exp_dir={exp}",
         f"model.restore_from_path={pre}", cwd=exp)
    return exp, pre, exp / "neva_finetune" / "neva_finetune.nemo"


def test_pretrain_writes_restorable_nemo_and_tensorboard_logs(runs):
    exp, pre, _ = runs
    model, _ = _state(str(pre))
    assert model.cfg.mm_cfg.llm.freeze is True
    assert glob.glob(str(exp / "neva_pretrain" / "*" / "events.out.tfevents.*"))


def test_finetune_unfreezes_the_lm_and_keeps_the_tower(runs):
    _, pre, fin = runs
    _, before = _state(str(pre))
    model, after = _state(str(fin))
    assert model.cfg.mm_cfg.llm.freeze is False and model.cfg.data.conv_template == "nvgpt"
    lm = [k for k in before if k.startswith("model.language_model.decoder.layers")]
    assert lm and any(not torch.equal(before[k], after[k]) for k in lm)
    tower = [k for k in before if k.startswith("model.vision_tower.")]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)


def test_generate_answers_from_the_finetuned_nemo(runs, tmp_path):
    _, _, fin = runs
    image = os.path.join(ROOT, "data", "shapes_demo", "images", "eval_00000.png")
    _run("neva_generate.py", f"neva_model_file={fin}", f"image_path={image}", "prompt=What shape is it?",
         "inference.tokens_to_generate=4", cwd=tmp_path)
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"image": "%s", "prompt": "What colour?"}\n{"prompt": "Hello"}\n' % image)
    _run("neva_generate.py", f"neva_model_file={fin}", f"prompts_file={jsonl}", f"output_file={tmp_path}/out.jsonl",
         "inference.tokens_to_generate=4", cwd=tmp_path)
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["prompt"] for r in rows] == ["What colour?", "Hello"] and all(isinstance(r["answer"], str) for r in rows)
