"""The PEFT user flow with the shipped scripts: pretrain (LLaMA-style) -> examples/neva_peft.py ->
scripts/merge_lora.py -> scripts/export_to_hf.py, each as a user runs it."""
import os
import subprocess
import sys

import pytest
import torch

from nemo_neva import MegatronNevaModel
from tests.model.helpers import ROOT

LLAMA = ["model.position_embedding_type=rope", "model.normalization=RMSNorm", "model.activation=swiglu",
         "model.bias=false", "model.num_query_groups=2"]


def _run(path, *args, cwd, ok=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, path), *args], cwd=str(cwd), capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
    assert (proc.returncode == 0) == ok, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


@pytest.mark.slow
def test_peft_example_merge_and_export(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from tests.export.hf_helpers import hf_logits, neva_logits, probe_inputs

    exp = tmp_path
    _run("examples/neva_pretrain.py", "trainer.max_steps=2", f"exp_manager.exp_dir={exp}", *LLAMA, cwd=exp)
    base = exp / "neva_pretrain" / "neva_pretrain.nemo"
    proc = _run("examples/neva_peft.py", "trainer.max_steps=3", f"exp_manager.exp_dir={exp}",
                f"model.restore_from_path={base}", "model.peft.lora.rank=4", cwd=exp)
    assert "trainable parameters" in proc.stdout
    peft_nemo = exp / "neva_peft" / "neva_peft.nemo"
    assert os.path.getsize(peft_nemo) < os.path.getsize(base) / 2
    # a PEFT .nemo is not a starting point for more PEFT: merge first
    err = _run("examples/neva_peft.py", f"exp_manager.exp_dir={exp / 'again'}",
               f"model.restore_from_path={peft_nemo}", cwd=exp, ok=False).stderr
    assert "already a PEFT .nemo" in err
    merged = exp / "merged.nemo"
    _run("scripts/merge_lora.py", "--peft-nemo", str(peft_nemo), "--output-path", str(merged), cwd=exp)
    _run("scripts/export_to_hf.py", "--nemo-path", str(merged), "--output-dir", str(exp / "hf"), cwd=exp)
    adapted = MegatronNevaModel.restore_from(str(peft_nemo))
    hf = LlavaForConditionalGeneration.from_pretrained(str(exp / "hf")).eval()
    ids, pixels = probe_inputs(adapted.image_token_id, len(adapted.tokenizer))
    lora_out = neva_logits(adapted, ids, pixels)
    # the merge's fp32 rounding plus transformers' kernels: the bound of tests/variants/test_lora.py's merged export
    torch.testing.assert_close(hf_logits(hf, ids, pixels), lora_out, rtol=0, atol=1e-4)
    plain = MegatronNevaModel.restore_from(str(base))
    assert not torch.allclose(neva_logits(plain, ids, pixels), lora_out, atol=1e-4)  # the adapters learned
