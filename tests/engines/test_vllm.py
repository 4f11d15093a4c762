"""vLLM's CPU build serves the folders `export_neva_to_hf` writes: its greedy tokens equal nemo_neva `generate`'s.

Three tiny random NeVA models (head size 32: vLLM's CPU attention needs >= 32) are exported here, in the project's
venv: LLaVA with a LLaMA-style LM (one image, two images, a multi-turn conversation; vicuna_v1), LLaVA-NeXT (anyres
tiling; a non-square image; chatml) and LLaVA whose LM is a Qwen2 imported with `llm.from_pretrained` (q/k/v
biases, tied embeddings, its own byte-level tokenizer; chatml). (A GPT-2 LM exports and loads in transformers, but
vLLM's LLaVA calls `language_model.model`, which its GPT-2 has not: vLLM cannot serve it.)
tests/engines/vllm_driver.py then runs in the vLLM venv (.venv-vllm, `make install-vllm`): one offline `vllm.LLM`
per model decodes the rendered prompts with their images, and `vllm serve`'s OpenAI server answers the same
requests as chat messages through the exported chat template. The oracle is nemo_neva's own `generate` on the
.nemo model: the same token ids (every reply runs to max_tokens), and for the chat route the same prompt ids (so
the chat template prompts the model exactly as nemo_neva renders it).
"""
import json
import os
import subprocess
import time

import pytest
import torch
from PIL import Image

from nemo_neva import build_model
from nemo_neva.data.conversation import render_prompt
from nemo_neva.export.hf import export_neva_to_hf
from nemo_neva.inference.generate import encode_prompt, generate_tokens
from tests.engines.engine_venv import PYTHON, require_venv
from tests.model.helpers import ROOT, llama_overrides, tiny_model_cfg

pytestmark = pytest.mark.vllm
MAX_TOKENS = 12
DRIVER_TIMEOUT_S = 1200  # three models, offline in one process, one server start each (~1-3 min on 2 cores)
VISION = {"mm_cfg.vision_encoder.config.num_attention_heads": 2}  # CLIP head size 32 as well


def _image(path, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()).save(path)
    return path


def _models(tmp_path):
    from tests.pretrained.lm_helpers import make_tiny_lm, neva_cfg

    llama = {**llama_overrides(), **VISION, "hidden_size": 128, "ffn_hidden_size": 256, "num_attention_heads": 4,
             "num_query_groups": 2, "encoder_seq_length": 256}
    qwen2 = str(tmp_path / "qwen2_lm")  # a non-LLaMA family, imported with llm.from_pretrained: q/k/v biases, tied
    make_tiny_lm("qwen2", qwen2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    return {
        "llava": (tiny_model_cfg(**llama, **{"data.conv_template": "vicuna_v1"}), "llama"),
        "next": (tiny_model_cfg(**llama, **{"data.conv_template": "chatml", "mm_cfg.image_tiling.enabled": True}),
                 "llama"),
        "qwen2": (neva_cfg(qwen2, **VISION, **{"data.conv_template": "chatml"}), "qwen2"),
    }


def _conversations(images):
    """(turns, OpenAI-style messages, images) per request: image parts where the turn's tags stand."""
    a, b, wide = images
    img = lambda p: {"type": "image", "path": p}  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    return {
        "llava": [
            ([{"from": "human", "value": "<image>\nWhat is in the picture?"}],
             [{"role": "user", "content": [img(a), text("What is in the picture?")]}], [a]),
            ([{"from": "human", "value": "<image>\n<image>\nWhich has more shapes?"}],
             [{"role": "user", "content": [img(a), img(b), text("Which has more shapes?")]}], [a, b]),
            ([{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A red square."},
              {"from": "human", "value": "And the colour of the border?"}],
             [{"role": "user", "content": [img(b), text("Describe it.")]},
              {"role": "assistant", "content": "A red square."},
              {"role": "user", "content": "And the colour of the border?"}], [b]),
        ],
        "next": [
            ([{"from": "human", "value": "<image>\nWhat is in the wide picture?"}],
             [{"role": "system", "content": "Answer briefly."},
              {"role": "user", "content": [img(wide), text("What is in the wide picture?")]}], [wide]),
            ([{"from": "human", "value": "<image>\nAnd here?"}],
             [{"role": "user", "content": [img(a), text("And here?")]}], [a]),
        ],
        "qwen2": [
            ([{"from": "human", "value": "<image>\nWhat colour is the shape?"}],
             [{"role": "user", "content": [img(a), text("What colour is the shape?")]}], [a]),
            ([{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A red square."},
              {"from": "human", "value": "Is it big?"}],
             [{"role": "user", "content": [img(b), text("Describe it.")]},
              {"role": "assistant", "content": "A red square."}, {"role": "user", "content": "Is it big?"}], [b]),
        ],
    }


def test_vllm_serves_the_export_with_generates_tokens(tmp_path):
    require_venv()
    images = [_image(str(tmp_path / "a.png"), 32, 32, 1), _image(str(tmp_path / "b.png"), 40, 36, 2),
              _image(str(tmp_path / "wide.png"), 40, 90, 3)]  # non-square: LLaVA-NeXT picks a 1x2 grid
    conversations = _conversations(images)
    spec, expected = {"models": [], "serve": list(conversations)}, {}
    for name, (cfg, family) in _models(tmp_path).items():
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        folder = str(tmp_path / name)
        export_neva_to_hf(model, folder)
        assert json.load(open(os.path.join(folder, "config.json")))["text_config"]["model_type"] == family
        template = cfg.data.conv_template
        system = lambda msgs: msgs[0]["content"] if msgs[0]["role"] == "system" else None  # noqa: E731
        prompts = [render_prompt(template, turns, system=system(msgs)) for turns, msgs, _ in conversations[name]]
        pil = [[Image.open(p).convert("RGB") for p in paths] for _, _, paths in conversations[name]]
        expected[name] = {
            "tokens": generate_tokens(model, pil, prompts, max_new_tokens=MAX_TOKENS, stop_token_ids=[]),
            "prompt_ids": [encode_prompt(model, p, ims).tolist() for p, ims in zip(prompts, pil)],
        }
        spec["models"].append({"name": name, "folder": folder, "max_model_len": 256, "max_tokens": MAX_TOKENS,
                               "requests": [{"prompt": p, "images": paths, "messages": msgs}
                                            for p, (_, msgs, paths) in zip(prompts, conversations[name])]})
    json.dump(spec, open(tmp_path / "spec.json", "w"))
    out = tmp_path / "vllm.json"
    started = time.monotonic()
    driver = os.path.join(ROOT, "tests", "engines", "vllm_driver.py")
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "1"}  # 1 GiB KV cache
    proc = subprocess.run([PYTHON, driver, str(tmp_path / "spec.json"), str(out)], capture_output=True, text=True,
                          timeout=DRIVER_TIMEOUT_S, env=env)
    print(f"vLLM driver: {time.monotonic() - started:.0f} s")
    first_error = proc.stderr.find("Traceback")  # the root cause, not vLLM's later "EngineDeadError"
    assert proc.returncode == 0, proc.stderr[max(first_error, 0):][:6000]
    got = json.load(open(out))
    print("offline (all models):", got["offline_seconds"], "s")
    for name, want in expected.items():
        print(name, "served in", got[name]["serve_seconds"], "s")
        assert got[name]["offline"] == want["tokens"], name
        served = got[name]["serve"]
        assert [s["prompt_token_ids"] for s in served] == want["prompt_ids"], name
        assert [s["token_ids"] for s in served] == want["tokens"], name
