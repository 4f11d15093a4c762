"""The Triton TensorRT-LLM backend's limits, on CPU (`TrtllmBackend.from_files` with the exported ONNX on
onnxruntime and `ReferenceRunner` in place of the engines): the context never passes the model's position table,
and a tensor-parallel engine (one process per rank under MPI) is refused by this one-process backend."""
import pytest

from nemo_neva.export.trtllm import export_neva_to_trtllm
from nemo_neva.serving.triton_trtllm import TrtllmBackend
from tests.export.trtllm_helpers import OnnxVision, tiny_neva
from tests.export.trtllm_reference import ReferenceRunner


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    model = tiny_neva("gpt", seed=9)  # learned absolute positions: a table of encoder_seq_length rows
    out = str(tmp_path_factory.mktemp("trt_limits") / "out")
    meta = export_neva_to_trtllm(model, out, dtype="float32")
    return model, out, meta


def test_context_is_capped_at_the_models_positions(export):
    model, out, meta = export
    assert model.cfg.position_embedding_type == "learned_absolute"
    runner = ReferenceRunner(f"{out}/{meta['llm_checkpoint']}", max_seq_len=512)  # an engine built longer
    backend = TrtllmBackend.from_files(out, OnnxVision(out, meta), runner)
    assert backend.context == model.cfg.encoder_seq_length == 64
    short = ReferenceRunner(f"{out}/{meta['llm_checkpoint']}", max_seq_len=48)  # a shorter engine: its own limit
    assert TrtllmBackend.from_files(out, OnnxVision(out, meta), short).context == 48


def test_a_tensor_parallel_engine_is_refused_with_one_line(export):
    model, out, meta = export
    runner = ReferenceRunner(f"{out}/{meta['llm_checkpoint']}")
    backend = TrtllmBackend.from_files(out, OnnxVision(out, meta), runner)
    with pytest.raises(ValueError, match="tp_size=2") as err:
        TrtllmBackend(out, dict(meta, tp_size=2), backend.tokenizer, backend.processor, backend.vision, runner)
    assert "\n" not in str(err.value) and "--tp-size 1" in str(err.value)
