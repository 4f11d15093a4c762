"""The Triton TensorRT-LLM backend serving a tiled (anyres) export, on CPU: the backend reads the export folder as on
a GPU (`TrtllmBackend.from_files`), the exported vision ONNX runs on onnxruntime in place of the TensorRT engine and
`ReferenceRunner` (an independent forward of the exported llm/ rank files, greedy) in place of TensorRT-LLM's
ModelRunner. Oracle: `generate_tokens` of the .nemo model on the same PIL images and prompt."""
import numpy as np
import pytest
import torch

from nemo_neva.data.constants import IMAGE_TOKEN
from nemo_neva.export.trtllm import export_neva_to_trtllm
from nemo_neva.inference.generate import encode_prompt, generate_tokens
from nemo_neva.inference.prompting import build_prompt
from nemo_neva.serving.limits import ServerLimits
from nemo_neva.serving.triton_model import InvalidInput, NevaTritonModel
from nemo_neva.serving.triton_trtllm import TrtllmBackend
from tests.export.trtllm_helpers import TILED, OnnxVision, tiny_neva
from tests.export.trtllm_reference import ReferenceRunner
from tests.serving.test_triton_model import pixels
from tests.serving.test_triton_multi_image import padded, request

TEMPLATE = "nv_steerlm"
LIMITS = ServerLimits(max_tokens=8, max_image_pixels=10000, max_text_chars=300, max_images=2)
MAX_INPUT = 240  # the stand-in engine's --max-input-len: two small tiled images fit, two of the largest grid do not
# Greedy tokens are compared exactly. They can only differ where two logits nearly tie: the exported checkpoint's
# logits match the model's within 2e-5 (tests/export/test_trtllm_script.py) and the ONNX features within 1e-5, so
# a best-vs-second gap of 1e-3 at every step leaves the comparison > 10x clear of that noise.
MIN_GAP = 1e-3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = tiny_neva("llama", seed=8, **TILED, **{"data.conv_template": TEMPLATE})
    out = str(tmp_path_factory.mktemp("tiled_serve") / "out")
    meta = export_neva_to_trtllm(model, out, dtype="float32")
    runner = ReferenceRunner(f"{out}/{meta['llm_checkpoint']}", max_batch_size=2, max_input_len=MAX_INPUT)
    backend = TrtllmBackend.from_files(out, OnnxVision(out, meta), runner)
    return model, meta, backend, runner, NevaTritonModel(backend, backend.template, LIMITS)


def _oracle_tokens(model, meta, question, arrays):
    from PIL import Image

    prompt = build_prompt(TEMPLATE, question, True)
    return generate_tokens(model, [[Image.fromarray(a) for a in arrays]], [prompt], max_new_tokens=LIMITS.max_tokens,
                           stop_token_ids=meta["stop_token_ids"], stop_strings=meta["stop_strings"])[0]


def _until_stop(tokens, stops):
    return tokens[:next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]


def test_prompts_are_sized_by_their_images_sizes(served):
    from PIL import Image

    model, _, backend, _, m = served
    prompt = build_prompt(TEMPLATE, f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\nCompare.", True)
    pairs = {"wide+tall": [pixels(1, 40, 90), pixels(2, 90, 40)], "wide+square": [pixels(1, 40, 90), pixels(3)]}
    counts = {}
    for name, arrays in pairs.items():
        pils = [Image.fromarray(a) for a in arrays]
        counts[name] = backend.prompt_tokens(prompt, pils)
        assert counts[name] == encode_prompt(model, prompt, pils).numel()
    assert counts["wide+tall"] != counts["wide+square"]
    big = [pixels(4, 64, 64), pixels(5, 64, 64)]  # two images filling the 2x2 grid: 2 x 88 image tokens
    assert model.tiling.tokens(64, 64) == model.tiling.max_tokens
    with pytest.raises(InvalidInput, match=rf"input 'input_text': the prompt is \d+ tokens; the engine was built "
                                           rf"for at most {MAX_INPUT}"):
        m([request("Compare.", np.stack(big))])


def test_two_differently_sized_images_give_generates_greedy_tokens(served):
    model, meta, backend, runner, m = served
    wide, tall, other = pixels(11, 40, 90), pixels(12, 90, 40), pixels(13, 50, 80)
    rows = [("Which has more shapes?", [wide, tall]), ("What is it?", [other])]
    data = {"input_text": np.array([[q.encode()] for q, _ in rows], dtype=np.object_),
            "input_media": np.stack([padded(wide, tall, h=90, w=90), padded(other, np.zeros((1, 1, 3), np.uint8),
                                                                            h=90, w=90)]),
            "input_media_sizes": np.array([[[40, 90], [90, 40]], [[50, 80], [0, 0]]], np.int64)}
    runner.calls.clear()
    got = m([data])[0]["outputs"][:, 0].tolist()
    (call,) = runner.calls  # both rows in one engine call: one table holds the three images' rows, in order
    assert call["rows"] == 2 and call["table_rows"] == sum(model.tiling.tokens(h, w) for h, w in
                                                           [(40, 90), (90, 40), (50, 80)])
    stops = set(meta["stop_token_ids"])
    for r, (question, arrays) in enumerate(rows):
        prompt_q = "\n".join([IMAGE_TOKEN] * len(arrays) + [question])
        expected = _oracle_tokens(model, meta, prompt_q, arrays)
        assert len(expected) > 0
        assert _until_stop(call["new_tokens"][r], stops) == expected, r
        assert got[r].decode() == model.tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert runner.min_gap > MIN_GAP, runner.min_gap
