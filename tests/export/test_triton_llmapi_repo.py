"""neva-triton-repo: the Triton model repository for TensorRT-LLM's LLM-API backend, checked against that backend's
documented template (tensorrtllm_backend all_models/llmapi/tensorrt_llm: config.pbtxt, 1/model.yaml; the backend's
model.py reads triton_config.decoupled / max_batch_size and passes every other model.yaml key to tensorrt_llm.LLM).
config.pbtxt is parsed with Triton's own ModelConfig protobuf (tritonclient). CPU only: no Triton server runs."""
import json
import os

import pytest
import yaml

from nemo_neva.commands.make_triton_repo import main
from nemo_neva.export.hf import export_neva_to_hf
from nemo_neva.export.triton_llmapi_repo import RepoError, write_triton_repo
from tests.export.trtllm_helpers import tiny_neva
from tests.optional import require

# the template's inputs (name: (data type, optional)) and outputs, as documented
TEMPLATE_INPUTS = {"text_input": ("TYPE_STRING", False), "streaming": ("TYPE_BOOL", True),
                   "sampling_param_beam_width": ("TYPE_INT32", True), "sampling_param_temperature": ("TYPE_FP32", True),
                   "sampling_param_top_k": ("TYPE_INT32", True), "sampling_param_top_p": ("TYPE_FP32", True),
                   "sampling_param_frequency_penalty": ("TYPE_FP32", True),
                   "sampling_param_presence_penalty": ("TYPE_FP32", True),
                   "sampling_param_max_tokens": ("TYPE_INT32", True), "sampling_param_stop": ("TYPE_STRING", True),
                   "sampling_param_seed": ("TYPE_UINT64", True),
                   "sampling_param_exclude_input_from_output": ("TYPE_BOOL", True),
                   "return_finish_reason": ("TYPE_BOOL", True), "return_stop_reason": ("TYPE_BOOL", True),
                   "return_cumulative_logprob": ("TYPE_BOOL", True)}
TEMPLATE_OUTPUTS = {"text_output": "TYPE_STRING", "finish_reason": "TYPE_STRING", "stop_reason": "TYPE_STRING",
                    "cumulative_logprob": "TYPE_FP32"}
LLM_API_KEYS = {"model", "backend", "tensor_parallel_size", "pipeline_parallel_size", "max_seq_len", "max_batch_size"}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return export_neva_to_hf(tiny_neva("llama"), str(tmp_path_factory.mktemp("triton") / "hf"))


def _parse_pbtxt(path):
    from google.protobuf import text_format
    model_config_pb2 = require("tritonclient.grpc.model_config_pb2")  # the triton extra

    with open(path) as f:
        return text_format.Parse(f.read(), model_config_pb2.ModelConfig())


def test_repository_matches_the_llmapi_template(export, tmp_path):
    repo = write_triton_repo(export, str(tmp_path / "repo"))
    cfg = _parse_pbtxt(os.path.join(repo, "tensorrt_llm", "config.pbtxt"))
    pb = require("tritonclient.grpc.model_config_pb2")

    assert cfg.name == "tensorrt_llm" and cfg.backend == "python"
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, pb.ModelInstanceGroup.KIND_CPU)]
    assert cfg.max_batch_size == 0  # left to model.yaml's triton_config (auto_complete_config)
    got = {i.name: (pb.DataType.Name(i.data_type), i.optional) for i in cfg.input}
    assert got == TEMPLATE_INPUTS
    assert {o.name: pb.DataType.Name(o.data_type) for o in cfg.output} == TEMPLATE_OUTPUTS

    with open(os.path.join(repo, "tensorrt_llm", "1", "model.yaml")) as f:
        args = yaml.safe_load(f)
    text = json.load(open(os.path.join(export, "config.json")))["text_config"]
    assert set(args) == LLM_API_KEYS | {"triton_config"}
    assert args["model"] == os.path.abspath(export) and os.path.isfile(os.path.join(args["model"], "config.json"))
    assert args["backend"] == "pytorch"
    assert args["tensor_parallel_size"] == 1 and args["pipeline_parallel_size"] == 1
    assert args["max_seq_len"] == text["max_position_embeddings"]
    assert args["max_batch_size"] == 8
    assert args["triton_config"] == {"max_batch_size": 0, "decoupled": False}
    assert sorted(os.listdir(os.path.join(repo, "tensorrt_llm", "1"))) == ["model.yaml"]


def test_streaming_tp_and_backend_files(export, tmp_path):
    backend = tmp_path / "backend"
    backend.mkdir()
    for name in ("model.py", "helpers.py"):
        (backend / name).write_text(f"# {name}\n")
    repo = write_triton_repo(export, str(tmp_path / "repo"), tp_size=2, max_batch_size=4, streaming=True,
                             backend_dir=str(backend))
    version = os.path.join(repo, "tensorrt_llm", "1")
    assert sorted(os.listdir(version)) == ["helpers.py", "model.py", "model.yaml"]
    args = yaml.safe_load(open(os.path.join(version, "model.yaml")))
    assert args["tensor_parallel_size"] == 2 and args["max_batch_size"] == 4
    assert args["triton_config"]["decoupled"] is True


def test_refusals_write_nothing(export, tmp_path):
    with pytest.raises(RepoError, match="attention heads"):  # tiny LM: 4 heads, 2 KV heads
        write_triton_repo(export, str(tmp_path / "a"), tp_size=4)
    with pytest.raises(RepoError, match="lacks model.py, helpers.py"):
        write_triton_repo(export, str(tmp_path / "b"), backend_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []
    (tmp_path / "notllava").mkdir()
    (tmp_path / "notllava" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert main(["--hf-dir", str(tmp_path / "notllava"), "--repo-dir", str(tmp_path / "c")]) == 2
    assert not os.path.exists(tmp_path / "c")
