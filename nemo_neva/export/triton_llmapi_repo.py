"""A Triton model repository for TensorRT-LLM's LLM-API (PyTorch) backend serving an exported Hugging Face folder.

The layout and options are those of the backend's template, `all_models/llmapi/tensorrt_llm/` (in
tensorrtllm_backend up to its move, now `triton_backend/all_models/llmapi/` in TensorRT-LLM; docs/llmapi.md):
  REPO/tensorrt_llm/config.pbtxt    a Python-backend model "tensorrt_llm": one CPU instance (the engine owns the
                                    GPUs), input text_input (+ streaming, sampling_param_*, return_*),
                                    outputs text_output, finish_reason, stop_reason, cumulative_logprob
  REPO/tensorrt_llm/1/model.yaml    keyword arguments of `tensorrt_llm.LLM` (model = the exported folder,
                                    backend "pytorch", tensor/pipeline parallel sizes, max_seq_len ...), and
                                    `triton_config` (max_batch_size, decoupled), which the backend's model.py
                                    applies to config.pbtxt at load time (auto_complete_config)
  REPO/tensorrt_llm/1/model.py, helpers.py   the backend's own code: copied from a TensorRT-LLM checkout or
                                    container (--backend-dir), never written here
That model takes text only (its config has no image input): through Triton the export answers text prompts;
image requests go to `trtllm-serve HF_DIR`'s OpenAI endpoint.
"""
from __future__ import annotations

import json
import os
import shutil

MODEL_NAME = "tensorrt_llm"
BACKEND_FILES = ("model.py", "helpers.py")
# (name, Triton data type, dims, optional) of the template's inputs and outputs
INPUTS = [("text_input", "TYPE_STRING", [-1], False), ("streaming", "TYPE_BOOL", [1], True)] + [
    (f"sampling_param_{name}", dtype, dims, True) for name, dtype, dims in (
        ("beam_width", "TYPE_INT32", [1]), ("temperature", "TYPE_FP32", [1]), ("top_k", "TYPE_INT32", [1]),
        ("top_p", "TYPE_FP32", [1]), ("frequency_penalty", "TYPE_FP32", [1]),
        ("presence_penalty", "TYPE_FP32", [1]), ("max_tokens", "TYPE_INT32", [1]), ("stop", "TYPE_STRING", [-1]),
        ("seed", "TYPE_UINT64", [1]), ("exclude_input_from_output", "TYPE_BOOL", [1]))] + [
    (f"return_{name}", "TYPE_BOOL", [1], True) for name in ("finish_reason", "stop_reason", "cumulative_logprob")]
OUTPUTS = [("text_output", "TYPE_STRING", [-1]), ("finish_reason", "TYPE_STRING", [-1]),
           ("stop_reason", "TYPE_STRING", [-1]), ("cumulative_logprob", "TYPE_FP32", [-1])]


class RepoError(ValueError):
    """The export or the options cannot make a model repository (the message names the fix)."""


def _export_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise RepoError(f"{hf_dir}: no config.json; pass a folder written by neva-export-hf")
    with open(path) as f:
        config = json.load(f)
    if not any(a.startswith("Llava") for a in config.get("architectures") or []):
        raise RepoError(f"{hf_dir}: architectures={config.get('architectures')}, not an HF LLaVA export "
                        "(neva-export-hf writes LlavaForConditionalGeneration / LlavaNextForConditionalGeneration)")
    return config


def _tensor_block(entries) -> str:
    rows = []
    for name, dtype, dims, *optional in entries:
        extra = "\n    optional: true" if optional and optional[0] else ""
        rows.append(f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: {json.dumps(dims)}{extra}\n  }}')
    return "[\n" + ",\n".join(rows) + "\n]"


def config_pbtxt() -> str:
    return (f'name: "{MODEL_NAME}"\nbackend: "python"\n\n'
            "# max_batch_size and the transaction policy (decoupled) come from 1/model.yaml's triton_config\n"
            "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n\n"
            f"input {_tensor_block(INPUTS)}\n\noutput {_tensor_block(OUTPUTS)}\n")


def model_yaml(hf_dir: str, config: dict, tp_size: int, max_batch_size: int, streaming: bool) -> dict:
    """The LLM-API keyword arguments, and triton_config, for the export in `hf_dir`."""
    text = config.get("text_config") or {}
    heads = text.get("num_attention_heads")
    kv_heads = text.get("num_key_value_heads") or heads
    if tp_size < 1 or (heads and (heads % tp_size or kv_heads % tp_size)):
        raise RepoError(f"--tp-size {tp_size}: the LM's {heads} attention heads / {kv_heads} KV heads must split "
                        "evenly over the tensor-parallel ranks")
    max_seq_len = text.get("max_position_embeddings") or text.get("n_positions")
    if not max_seq_len:
        raise RepoError(f"{hf_dir}: text_config has no max_position_embeddings / n_positions")
    return {
        "model": os.path.abspath(hf_dir), "backend": "pytorch",
        "tensor_parallel_size": tp_size, "pipeline_parallel_size": 1,
        "max_seq_len": int(max_seq_len), "max_batch_size": max_batch_size,
        # Triton's own batching stays off (max_batch_size 0), as the backend's template says: requests are
        # batched in flight by the engine (the LLM-API max_batch_size above)
        "triton_config": {"max_batch_size": 0, "decoupled": bool(streaming)},
    }


def write_triton_repo(hf_dir: str, repo_dir: str, tp_size: int = 1, max_batch_size: int = 8,
                      streaming: bool = False, backend_dir: str | None = None) -> str:
    """Write REPO/tensorrt_llm/{config.pbtxt, 1/model.yaml} (+ the backend's model.py / helpers.py copied from
    `backend_dir`); `repo_dir` must be new or empty; a refusal writes nothing."""
    import yaml

    config = _export_config(hf_dir)
    args = model_yaml(hf_dir, config, tp_size, max_batch_size, streaming)
    if backend_dir is not None:
        missing = [f for f in BACKEND_FILES if not os.path.isfile(os.path.join(backend_dir, f))]
        if missing:
            raise RepoError(f"--backend-dir {backend_dir} lacks {', '.join(missing)}; pass TensorRT-LLM's "
                            "triton_backend/all_models/llmapi/tensorrt_llm/1")
    repo_dir = os.path.abspath(repo_dir)
    if os.path.exists(repo_dir) and (not os.path.isdir(repo_dir) or os.listdir(repo_dir)):
        raise FileExistsError(f"{repo_dir} exists and is not an empty folder; write the repository into a new one")
    version = os.path.join(repo_dir, MODEL_NAME, "1")
    os.makedirs(version)
    with open(os.path.join(repo_dir, MODEL_NAME, "config.pbtxt"), "w") as f:
        f.write(config_pbtxt())
    with open(os.path.join(version, "model.yaml"), "w") as f:
        f.write("# tensorrt_llm.LLM keyword arguments (PyTorch backend); triton_config: Triton's model settings\n")
        yaml.safe_dump(args, f, sort_keys=False)
    if backend_dir is not None:
        for name in BACKEND_FILES:
            shutil.copy(os.path.join(backend_dir, name), version)
    return repo_dir
