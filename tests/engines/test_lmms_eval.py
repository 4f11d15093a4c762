"""lmms-eval, the way VLM users evaluate, against `neva-serve`: its answers are `generate`'s, its metric their score.

lmms-eval 0.7.3 (installed into the vLLM venv by scripts/install_vllm.sh) runs its own CLI with the
`openai_compatible` model against examples/neva_serve.py serving a tiny random .nemo, on a LOCAL task: a task YAML
whose dataset is a JSON-lines file (`dataset_path: json` + `data_files`) with image paths, found through
`--include_path` (lmms-eval 0.7.3 does not take a YAML path as `--tasks`), offline (HF_*_OFFLINE).
Oracle: the answers lmms-eval logs (--log_samples) equal nemo_neva's `generate` for the same prompts (the server
renders an image part followed by text as build_prompt does), and lmms-eval's exact_match equals the score of those
answers against the task's targets. Half the targets are `generate`'s answers and half are not, so the expected
score is 0.5: a response lmms-eval lost, reordered or mangled moves it.
"""
import glob
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from nemo_neva import build_model
from nemo_neva.inference.prompting import build_prompt
from nemo_neva.parallel.init import free_port
from nemo_neva.serving.worker import serving_stops
from tests.engines.engine_venv import PYTHON, require_venv
from tests.model.helpers import ROOT, tiny_model_cfg
from tests.serving.serving_helpers import coloured

pytestmark = pytest.mark.vllm
TEMPLATE = "vicuna_v1"
TASK = "neva_local_vqa"
MAX_TOKENS = 8
QUESTIONS = ["What colour is the shape?", "Describe the picture.", "Is there a circle?", "How many shapes?"]
SERVER_START_S = 300  # the server imports NeMo + megatron-core and restores the .nemo (~1 min on 2 busy cores)
LMMS_TIMEOUT_S = 600  # lmms-eval imports torch, transformers, datasets (~1-2 min), then 4 short requests


def _start_server(nemo_path, folder):
    port = free_port()
    log_path = os.path.join(folder, "server.log")
    args = [sys.executable, os.path.join(ROOT, "examples", "neva_serve.py"), f"neva_model_file={nemo_path}",
            f"server.port={port}", f"conv_template={TEMPLATE}", "served_model_name=tiny-neva"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"neva_serve exited with {proc.returncode}:\n{open(log_path).read()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"neva_serve did not come up in {SERVER_START_S} s")


def _task_dir(folder, data_file):
    """A local lmms-eval task: a JSON-lines dataset, image paths as the visual, exact match as the metric."""
    os.makedirs(os.path.join(folder, "tasks"))
    path = os.path.join(folder, "tasks", "neva_local_vqa.yaml")
    with open(path, "w") as f:
        f.write(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: generate_until
doc_to_visual: image
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_TOKENS}
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return os.path.dirname(path)


def test_lmms_eval_against_neva_serve_scores_generates_answers(tmp_path):
    require_venv()
    probe = "import importlib.util as u, sys; sys.exit(u.find_spec('lmms_eval') is None)"
    if subprocess.run([PYTHON, "-c", probe]).returncode:  # a venv from before lmms-eval joined install_vllm.sh
        pytest.fail(f"lmms_eval is not in {PYTHON}: run `make install-vllm` again (install_vllm.sh installs it)")
    folder = str(tmp_path)
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(encoder_seq_length=192, **{"data.conv_template": TEMPLATE}))
    nemo_path = os.path.join(folder, "tiny-neva.nemo")
    model.save_to(nemo_path)
    model.eval()
    proc, url = _start_server(nemo_path, folder)
    try:
        images = [coloured(seed) for seed in range(len(QUESTIONS))]
        stop_ids, stop_strings = serving_stops(model, TEMPLATE)
        answers = [model.generate([im], [build_prompt(TEMPLATE, q, True)], max_new_tokens=MAX_TOKENS,
                                  stop_token_ids=stop_ids, stop_strings=stop_strings)[0]
                   for im, q in zip(images, QUESTIONS)]
        docs = []
        for k, (im, q, a) in enumerate(zip(images, QUESTIONS, answers)):
            im.save(os.path.join(folder, f"img{k}.png"))
            target = a if k % 2 == 0 else a + " (not the answer)"  # docs 0 and 2 match, 1 and 3 do not
            docs.append({"id": k, "image": os.path.join(folder, f"img{k}.png"), "question": q, "answer": target})
        data_file = os.path.join(folder, "data.jsonl")
        with open(data_file, "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
        out = os.path.join(folder, "lmms_out")
        # num_concurrent=1: one request at a time, as the oracle decodes each prompt alone
        model_args = f"model=tiny-neva,base_url={url}/v1,api_key=none,num_concurrent=1,max_retries=1,timeout=300"
        env = {**os.environ, "PYTHONPATH": "", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "HF_HOME": os.path.join(folder, "hf_home"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        started = time.monotonic()
        run = subprocess.run(
            [PYTHON, "-m", "lmms_eval", "--model", "openai_compatible", "--model_args", model_args,
             "--include_path", _task_dir(folder, data_file), "--tasks", TASK, "--batch_size", "1",
             "--log_samples", "--output_path", out],
            cwd=folder, capture_output=True, text=True, timeout=LMMS_TIMEOUT_S, env=env)
        print(f"lmms-eval: {time.monotonic() - started:.0f} s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert run.returncode == 0 and "Traceback" not in run.stderr, (run.stdout + run.stderr)[-6000:]  # it may exit 0
    samples_files = glob.glob(os.path.join(out, "**", f"*_samples_{TASK}.jsonl"), recursive=True)
    results_files = glob.glob(os.path.join(out, "**", "*_results.json"), recursive=True)
    assert len(samples_files) == 1 and len(results_files) == 1, (samples_files, results_files, run.stderr[-3000:])
    samples = sorted((json.loads(line) for line in open(samples_files[0])), key=lambda s: s["doc_id"])
    got = [s["filtered_resps"] for s in samples]  # a failed request logs "[LMMS_EVAL_REQUEST_FAILED ...]" here
    assert got == answers
    score = sum(a == d["answer"] for a, d in zip(answers, docs)) / len(docs)
    metric = json.load(open(results_files[0]))["results"][TASK]["exact_match,none"]
    print(f"lmms-eval exact_match {metric} (expected {score}); answers {answers}")
    assert metric == pytest.approx(score) and score == 0.5
