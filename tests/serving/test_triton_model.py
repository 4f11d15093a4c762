"""The Triton model's request contract without a server: inputs, checks, batching, environment, GPU refusal.

The real tritonserver runs in test_triton_server.py; here the callable PyTriton binds is called directly.
"""
import os
import subprocess
import sys
import traceback

import numpy as np
import pytest
import torch

from nemo_neva import build_model
from nemo_neva.inference.prompting import build_prompt
from nemo_neva.serving.limits import ServerLimits
from nemo_neva.serving.triton_env import TritonEnvError, check_stub_env, libpython_dir
from nemo_neva.serving.triton_model import InvalidInput, NevaTritonModel, TorchBackend, model_inputs
from nemo_neva.serving.triton_server import TritonSettings
from nemo_neva.serving.triton_trtllm import require_tensorrt_llm
from nemo_neva.serving.worker import serving_stops
from tests.model.helpers import ROOT, llama_overrides, tiny_model_cfg


def llm_export_dir(tmp_path, model, vocab) -> str:
    """An export folder holding what TrtllmBackend reads besides the engines: the LLM checkpoint's config.json, as
    the TensorRT-LLM export writes it (the backend caps its context at its max_position_embeddings)."""
    import json

    from nemo_neva.export.trtllm_layout import trtllm_config

    os.makedirs(tmp_path / "llm", exist_ok=True)
    with open(tmp_path / "llm" / "config.json", "w") as f:
        json.dump(trtllm_config(model.cfg, vocab, "float32", 1), f)
    return str(tmp_path)

TEMPLATE = "nv_steerlm"
LIMITS = ServerLimits(max_tokens=8, max_image_pixels=4096, max_text_chars=300, max_images=2)


def pixels(seed, h=32, w=32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()


def request(text, image=None, **scalars):
    """One Triton request as PyTriton hands it over: arrays with the batch dimension (one row)."""
    dtypes = {"max_output_len": np.int64, "top_k": np.int64, "num_beams": np.int64, "batch_size": np.int64,
              "random_seed": np.int64, "top_p": np.float32, "temperature": np.float32,
              "repetition_penalty": np.float32}
    data = {"input_text": np.array([[text.encode()]], dtype=np.object_)}
    if image is not None:
        data["input_media"] = image[np.newaxis, np.newaxis]
    for name, value in scalars.items():
        data[name] = np.array([[value]], dtype=dtypes.get(name, np.int32))
    return data


class FakeBackend:
    """Counts tokens by characters and records every generate call."""
    name, context = "fake", 64

    def __init__(self):
        self.calls = []

    def prompt_tokens(self, prompt, images):
        return len(prompt) // 8 + 16 * (images if isinstance(images, int) else len(images))

    def prepare(self, prompt, images):
        return prompt, self.prompt_tokens(prompt, images)

    def generate(self, prompts, s):
        self.calls.append((len(prompts), s))
        return [f"answer {len(p)}" for p in prompts]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_model_cfg(encoder_seq_length=192)).eval()


def test_inputs_follow_nemo1_and_steerlm_only_for_its_template():
    specs = {s.name: s for s in model_inputs(TEMPLATE)}
    assert [n for n in specs][:10] == ["input_text", "input_media", "max_output_len", "top_k", "top_p", "temperature",
                                       "repetition_penalty", "num_beams", "batch_size", "random_seed"]
    assert specs["input_text"].dtype is np.bytes_ and not specs["input_text"].optional
    assert specs["input_media"].dtype is np.uint8 and specs["input_media"].shape == (-1, -1, -1, 3)
    assert specs["top_k"].dtype is np.int64 and specs["top_p"].dtype is np.float32
    assert all(specs[n].dtype is np.int32 for n in ("quality", "toxicity", "humor", "creativity", "violence",
                                                    "helpfulness", "not_appropriate"))
    assert "humor" not in {s.name for s in model_inputs("vicuna_v1")}


def test_same_settings_share_one_generate_and_greedy_ignores_sampling_knobs():
    backend = FakeBackend()
    m = NevaTritonModel(backend, TEMPLATE, LIMITS)
    out = m([request("a", pixels(1)), request("bb", pixels(2), top_k=1, temperature=0.7),
             request("ccc", temperature=0.0, top_p=0.3), request("d", temperature=0.9, top_k=5, random_seed=3)])
    assert [len(o["outputs"]) for o in out] == [1, 1, 1, 1]
    assert all(o["outputs"].dtype == np.object_ and o["outputs"].shape == (1, 1) for o in out)
    # the three greedy rows decode together; the sampled one alone
    assert sorted(n for n, _ in backend.calls) == [1, 3]
    sampled = next(s for n, s in backend.calls if n == 1)
    assert (sampled.temperature, sampled.top_k, sampled.seed) == (pytest.approx(0.9), 5, 3)  # 0.9 came as float32
    # NeMo 1's client defaults (top_k=1, top_p=0, temperature=1): greedy
    m([request("e", batch_size=1, top_k=1, top_p=0.0, temperature=1.0, repetition_penalty=1.0, num_beams=1)])
    assert backend.calls[-1][1].greedy and backend.calls[-1][1].top_p == 1.0


def test_batched_answers_equal_one_at_a_time(model):
    m = NevaTritonModel(TorchBackend(model, TEMPLATE), TEMPLATE, LIMITS)
    reqs = [request("What is it?", pixels(1)), request("Describe the image.", pixels(2), max_output_len=5),
            request("Say something.", humor=2), request("What colour?", pixels(3), temperature=1.0, random_seed=9),
            request("Tell me more.", pixels(4)), request("What colour?", pixels(5), temperature=1.0, random_seed=9)]
    together = [o["outputs"][0, 0] for o in m(reqs)]
    alone = [m([r])[0]["outputs"][0, 0] for r in reqs]
    assert together == alone
    ids, strings = serving_stops(model, TEMPLATE)
    from PIL import Image

    expected = model.generate([Image.fromarray(pixels(1))], [build_prompt(TEMPLATE, "What is it?", True)],
                              max_new_tokens=LIMITS.max_tokens, stop_token_ids=ids, stop_strings=strings)[0]
    assert together[0].decode() == expected


def test_each_row_is_encoded_once_and_generated_from_that_encoding(model, monkeypatch):
    """The processor encodes a row in `parse` (its length sets the budget); `generate` runs those NevaInputs
    without encoding the prompt again."""
    from nemo_neva.data.processor import NevaProcessor

    m = NevaTritonModel(TorchBackend(model, TEMPLATE), TEMPLATE, LIMITS)
    reqs = [request("What is it?", pixels(1)), request("Say something.")]
    want = [o["outputs"][0, 0] for o in m(reqs)]
    encoded, original = [], NevaProcessor._encode_expanded

    def counting(self, prompt, images, frames):
        encoded.append(prompt)
        return original(self, prompt, images, frames)

    monkeypatch.setattr(NevaProcessor, "_encode_expanded", counting)
    rows = [row for r in reqs for row in m.parse(r)]
    assert len(encoded) == 2 and [row.encoded.ids.numel() for row in rows] == \
        [int(original(model.processor, row.prompt, row.images or 0, None).numel()) for row in rows]
    assert rows[0].encoded.pixels.shape[0] == 1 and rows[1].encoded.pixels is None
    assert [o["outputs"][0, 0] for o in m(reqs)] == want and len(encoded) == 4  # 2 more: the second call's parse


def test_a_client_batch_of_rows_is_answered_row_by_row(model):
    m = NevaTritonModel(TorchBackend(model, TEMPLATE), TEMPLATE, LIMITS)
    one = [m([request(q, pixels(i))])[0]["outputs"][0, 0] for i, q in enumerate(["What is it?", "Tell me more."])]
    rows = {"input_text": np.array([[b"What is it?"], [b"Tell me more."]], dtype=np.object_),
            "input_media": np.stack([pixels(0), pixels(1)])[:, np.newaxis],
            "top_k": np.array([[1], [1]], dtype=np.int64)}
    assert m([rows])[0]["outputs"][:, 0].tolist() == one


BAD = {
    "temperature_negative": (dict(temperature=-0.5), "temperature"),
    "temperature_nan": (dict(temperature=float("nan")), "temperature"),
    "top_p_above_one": (dict(top_p=1.5), "top_p"),
    "top_k_negative": (dict(top_k=-1), "top_k"),
    "seed_negative": (dict(random_seed=-1), "random_seed"),
    "penalty_zero": (dict(repetition_penalty=0.0), "repetition_penalty"),
    "beams": (dict(num_beams=2), "num_beams"),
    "max_output_len_zero": (dict(max_output_len=0), "max_output_len"),
    "max_output_len_over_cap": (dict(max_output_len=9), "max_output_len"),
    "steerlm_out_of_range": (dict(humor=12), "humor"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_values_raise_invalid_input_naming_it(case):
    kwargs, name = BAD[case]
    m = NevaTritonModel(FakeBackend(), TEMPLATE, LIMITS)
    with pytest.raises(InvalidInput, match=rf"^input '{name}': "):
        m([request("hi", pixels(1), **kwargs)])


def test_bad_text_and_images():
    m = NevaTritonModel(FakeBackend(), TEMPLATE, LIMITS)
    cases = [(request("x" * 301), "input_text", "exceeds the limit of 300"),
             (request("look <image> and <image>", pixels(1)), "input_text", "2 image tag.*for 1 image"),
             (request("look <image>"), "input_text", "1 image tag.*for 0 image"),
             (request("hi", pixels(1, 80, 80)), "input_media", "6400 pixels exceed the limit of 4096"),
             ({"input_text": np.array([[b"\xff\xfe"]], dtype=np.object_)}, "input_text", "UTF-8"),
             ({**request("hi"), "input_media": np.zeros((1, 3, 8, 8, 3), np.uint8)}, "input_media",
              r"3 images in one prompt; this server takes at most 2 per prompt \(limits.max_images\)")]
    for req, name, words in cases:
        with pytest.raises(InvalidInput, match=rf"input '{name}': .*{words}"):
            m([req])
    # max_output_len that fits the cap but not the context left after the prompt
    m.backend.context = m.backend.prompt_tokens(build_prompt(TEMPLATE, "hi", True), True) + 4
    with pytest.raises(InvalidInput, match=r"input 'max_output_len': max_output_len=8 \+ \d+ prompt tokens exceed"):
        m([request("hi", pixels(1), max_output_len=8)])
    m.backend.context = FakeBackend.context
    # N = 0 images: a text-only prompt
    empty = {**request("hi"), "input_media": np.zeros((1, 0, 8, 8, 3), np.uint8)}
    assert m([empty])[0]["outputs"][0, 0] == b"answer " + str(len(build_prompt(TEMPLATE, "hi", False))).encode()


def test_a_bad_request_in_a_dynamic_batch_is_named_and_its_trace_stays_in_the_log():
    """PyTriton (pytriton/proxy/inference.py) logs `traceback.format_exc()` in its except block and sends the client
    `format_exception(None, e, e.__traceback__)`: the same two calls here."""
    m = NevaTritonModel(FakeBackend(), TEMPLATE, LIMITS)
    try:
        m([request("fine"), request("bad", temperature=5.0), request("fine too")])
        pytest.fail("the bad request was not refused")
    except InvalidInput as e:
        server_log = traceback.format_exc()
        client = "".join(traceback.format_exception(None, e, e.__traceback__))
    assert client.startswith("nemo_neva.serving.triton_model.InvalidInput: request 2 of 3: input 'temperature'")
    assert "File " not in client  # what PyTriton sends the client: no frames, no paths
    assert server_log.startswith("Traceback (most recent call last):")  # the server log keeps the frames
    assert 'triton_model.py", line' in server_log and "in __call__" in server_log, server_log
    assert server_log.rstrip().endswith(client.rstrip())


def test_settings_and_environment_checks(tmp_path):
    for bad in (dict(http_port=0), dict(grpc_port=8000), dict(model_name="a b"), dict(max_batch_size=0)):
        with pytest.raises(ValueError):
            TritonSettings(**bad)
    with pytest.raises(ValueError, match="unknown triton"):
        TritonSettings.from_cfg({"http_prot": 1})
    with pytest.raises(TritonEnvError, match="nemo_neva.serving.triton_env"):
        check_stub_env(str(tmp_path))
    lib = libpython_dir()
    assert any(f.startswith("libpython3") for f in os.listdir(lib))
    with pytest.raises(ValueError, match=r"^limits\.max_tokens must be > 0"):
        ServerLimits.from_cfg({"max_tokens": 0}, section="limits")


def test_trt_engine_dir_is_refused_clearly_without_tensorrt_llm(tmp_path):
    try:
        import tensorrt_llm  # noqa: F401
        # not optional: this test is for machines *without* TensorRT-LLM
        pytest.skip("TensorRT-LLM is installed here: scripts/trtllm_gpu_check.sh covers the engine path")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="tensorrt_llm.*neva_model_file"):
        require_tensorrt_llm(str(tmp_path))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "neva_triton.py"),
                           f"trt_engine_dir={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: trt_engine_dir=" in proc.stderr and "needs tensorrt_llm" in proc.stderr


class FakeRunner:
    """Stands in for tensorrt_llm.runtime.ModelRunner: checks that each row's fake prompt ids address its own
    image's features in the batch's prompt table, and answers with the PyTorch model's greedy tokens."""

    max_batch_size, max_input_len, max_seq_len = 2, 150, 192

    def __init__(self, model, vocab, cases):
        self.model, self.vocab, self.cases, self.calls = model, vocab, cases, []

    def generate(self, batch_input_ids, max_new_tokens, end_id, pad_id, prompt_table=None, prompt_tasks=None, **kw):
        self.calls.append(dict(kw, rows=len(batch_input_ids), tasks=prompt_tasks, max_new_tokens=max_new_tokens))
        outs = []
        for ids in batch_input_ids:
            fake = ids >= self.vocab
            real = torch.where(fake, torch.tensor(self.model.image_token_id, dtype=ids.dtype), ids).long()
            case = next((c for c in self.cases if torch.equal(c["ids"], real)), None)
            assert case is not None, "a row that is no request's prompt"
            if case["feats"] is not None:
                assert torch.equal(prompt_table[0][ids[fake].long() - self.vocab], case["feats"])
            else:
                assert not bool(fake.any())
            outs.append(ids.tolist() + case["tokens"] + [end_id])
        width = max(len(o) for o in outs) + 3
        output_ids = torch.tensor([[o + [pad_id] * (width - len(o))] for o in outs])
        return {"output_ids": output_ids, "sequence_lengths": torch.tensor([[len(o)] for o in outs])}


def test_tensorrt_llm_backend_feeds_each_row_its_image_through_the_prompt_table(model, tmp_path):
    """The GPU backend's glue on CPU: fake ids and one prompt table per batch, chunking by the engine's batch
    size, greedy/sampling arguments, stop handling; the engines themselves run in trtllm_gpu_check.sh."""
    from nemo_neva.export.trtllm import export_vocab_size
    from nemo_neva.inference.generate import encode_prompt, generate_tokens
    from nemo_neva.serving.triton_trtllm import TrtllmBackend
    from PIL import Image

    vocab = export_vocab_size(model)
    ids, strings = serving_stops(model, TEMPLATE)
    meta = {"conv_template": TEMPLATE, "stop_token_ids": sorted(ids), "stop_strings": strings, "vocab_size": vocab,
            "image_token_id": model.image_token_id, "tokens_per_image": model.tokens_per_image,
            "image_aspect_ratio": model.image_aspect_ratio}
    questions = [("What is it?", pixels(1)), ("Say something.", None), ("Describe the image.", pixels(2))]
    cases = []
    for q, img in questions:
        pil = Image.fromarray(img) if img is not None else None
        prompt = build_prompt(TEMPLATE, q, img is not None)
        feats = None
        if pil is not None:
            with torch.no_grad():
                feats = model.model.encode_images(model.image_processor(images=pil, return_tensors="pt")
                                                  ["pixel_values"])[0]
        tokens = generate_tokens(model, [pil], [prompt], max_new_tokens=6, stop_token_ids=sorted(ids),
                                 stop_strings=strings)[0]
        cases.append(dict(ids=encode_prompt(model, prompt, pil is not None), feats=feats, tokens=tokens))

    def vision(px):
        with torch.no_grad():
            return model.model.encode_images(px)

    runner = FakeRunner(model, vocab, cases)
    backend = TrtllmBackend(llm_export_dir(tmp_path, model, vocab), meta, model.tokenizer, model.image_processor, vision, runner)
    m = NevaTritonModel(backend, TEMPLATE, LIMITS)
    out = m([request(q, img, max_output_len=6) for q, img in questions])
    expected = [model.tokenizer.decode(c["tokens"], skip_special_tokens=True).strip() for c in cases]
    assert [o["outputs"][0, 0].decode() for o in out] == expected
    assert [c["rows"] for c in runner.calls] == [2, 1]  # the engine's max batch size
    assert runner.calls[0]["tasks"] == "0,0" and runner.calls[0]["top_k"] == 1 and runner.calls[0]["top_p"] == 0.0
    m([request("Say something.", temperature=0.8, top_k=5, top_p=0.9, random_seed=4, max_output_len=6)])
    last = runner.calls[-1]  # temperature and top_p arrive as float32: approx
    assert (last["temperature"], last["top_k"], last["top_p"], last["random_seed"]) == (pytest.approx(0.8), 5,
                                                                                         pytest.approx(0.9), 4)
    with pytest.raises(InvalidInput, match="input 'input_text': the prompt is .* engine was built for at most 150"):
        m([request("a b c d e f g " * 20, pixels(3))])


def test_a_tiled_model_counts_each_image_by_its_size_and_answers_as_generate():
    """anyres: the prompt budget needs the images themselves (placeholders depend on each image's size)."""
    from PIL import Image

    torch.manual_seed(0)
    tiled = build_model(tiny_model_cfg(**llama_overrides(), **{"mm_cfg.image_tiling.enabled": True,
                                                                     "encoder_seq_length": 512})).eval()
    m = NevaTritonModel(TorchBackend(tiled, TEMPLATE), TEMPLATE, LIMITS)
    wide, tall = pixels(1, 40, 90), pixels(2, 90, 40)
    prompt = build_prompt(TEMPLATE, "What is it?", True)
    counts = [m.backend.prompt_tokens(prompt, [Image.fromarray(px)]) for px in (wide, tall)]
    assert counts[0] != counts[1]  # the two shapes tile differently
    ids, strings = serving_stops(tiled, TEMPLATE)
    for px in (wide, tall):
        got = m([request("What is it?", px)])[0]["outputs"][0, 0].decode()
        assert got == tiled.generate([Image.fromarray(px)], [prompt], max_new_tokens=LIMITS.max_tokens,
                                     stop_token_ids=ids, stop_strings=strings)[0]
