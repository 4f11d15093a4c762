"""Generation at TP=2 on CPU (torchrun, 2 processes, gloo): the same greedy tokens as TP=1, KV cache and all.

Each rank holds half the attention heads (so half of every layer's KV cache) and half the vocabulary.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from nemo_neva import MegatronNevaModel, build_model
from nemo_neva.inference.generate import generate_tokens
from nemo_neva.parallel.init import free_port
from tests.model.helpers import ROOT, llama_overrides, tiny_model_cfg

WORKER = os.path.join(ROOT, "tests", "inference", "tp_generate_worker.py")
PROMPTS = ["<image>\nWhat colour is the shape?", "A text-only prompt of another length.", "<image>\nHi"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpgen")
    torch.manual_seed(3)
    model = build_model(tiny_model_cfg(**llama_overrides()))
    nemo = str(root / "model.nemo")
    model.save_to(nemo)
    g = torch.Generator().manual_seed(8)
    requests = {"prompts": PROMPTS, "max_new_tokens": 10,
                "images": [torch.rand(3, 32, 32, generator=g) if "<image>" in p else None for p in PROMPTS]}
    torch.save(requests, str(root / "requests.pt"))
    reference = generate_tokens(MegatronNevaModel.restore_from(nemo), requests["images"], PROMPTS,
                                max_new_tokens=10, stop_token_ids=[])
    return root, nemo, reference


def _torchrun(root, nemo, out, *flags):
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", WORKER, "--nemo", nemo, "--requests", str(root / "requests.pt"),
           "--out", out, *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in (0, 1)]


def _check(ranks, reference, sp):
    assert all(len(t) == 10 for t in reference)
    for rank in ranks:
        assert rank["greedy"] == reference
        assert rank["sp_after"] is sp  # sequence parallelism is back on after generating
    assert ranks[0]["sampled"] == ranks[1]["sampled"]


def test_tp2_greedy_equals_tp1(saved):
    root, nemo, reference = saved
    _check(_torchrun(root, nemo, str(root / "tp2")), reference, sp=False)


@pytest.mark.slow
def test_tp2_with_sequence_parallel_greedy_equals_tp1(saved):
    root, nemo, reference = saved
    _check(_torchrun(root, nemo, str(root / "tp2sp"), "--sp"), reference, sp=True)
