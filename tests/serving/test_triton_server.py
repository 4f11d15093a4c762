"""A tiny .nemo served by examples/neva_triton.py through a real tritonserver (PyTriton) on loopback, driven
by the official tritonclient over HTTP and gRPC. One server for the module; the last test shuts it down.
"""
import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from nemo_neva import build_model
from nemo_neva.inference.prompting import build_prompt
from nemo_neva.parallel.init import free_port
from nemo_neva.serving.worker import serving_stops
from tests.model.helpers import ROOT, tiny_model_cfg
from tests.optional import require

tritonclient_http = require("tritonclient.http")
tritonclient_grpc = require("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

TEMPLATE = "nv_steerlm"
MODEL = "neva"
LIMITS = {"max_tokens": 10, "max_image_pixels": 4096, "max_text_chars": 400, "max_images": 2}
FRAMES = 3  # the served model's model.data.video.num_frames
QUEUE_DELAY_MS = 300  # long enough that concurrent test requests meet in Triton's dynamic batcher
DTYPES = {"max_output_len": ("INT64", np.int64), "top_k": ("INT64", np.int64), "num_beams": ("INT64", np.int64),
          "batch_size": ("INT64", np.int64), "random_seed": ("INT64", np.int64), "top_p": ("FP32", np.float32),
          "temperature": ("FP32", np.float32), "repetition_penalty": ("FP32", np.float32)}


class Served:
    def __init__(self, proc, ports, model, log_path):
        self.proc, self.model, self.log_path = proc, model, log_path
        self.http, self.grpc, self.metrics = (f"127.0.0.1:{p}" for p in ports)

    def client(self, protocol="http"):
        if protocol == "grpc":
            return tritonclient_grpc.InferenceServerClient(self.grpc)
        return tritonclient_http.InferenceServerClient(self.http, network_timeout=300, connection_timeout=300)

    def log(self):
        with open(self.log_path) as f:
            return f.read()


def _ports(n=3):
    ports = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("triton")
    path = str(folder / "tiny-neva.nemo")
    torch.manual_seed(0)
    # video frames pooled 2x2 (model.mm_cfg.video.pool): a <video> tag takes FRAMES slots, each 4 tokens
    model = build_model(tiny_model_cfg(encoder_seq_length=192, **{"mm_cfg.video.pool": "2x2",
                                                                        "data.video.num_frames": FRAMES}))
    model.save_to(path)
    model.eval()
    ports = _ports()
    log_path = str(folder / "server.log")
    args = [sys.executable, os.path.join(ROOT, "examples", "neva_triton.py"), f"neva_model_file={path}",
            f"conv_template={TEMPLATE}", f"triton.model_name={MODEL}", f"triton.http_port={ports[0]}",
            f"triton.grpc_port={ports[1]}", f"triton.metrics_port={ports[2]}", "triton.max_batch_size=8",
            f"triton.max_queue_delay_ms={QUEUE_DELAY_MS}", "triton.exit_timeout_s=5",
            *[f"limits.{k}={v}" for k, v in LIMITS.items()]]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=str(folder), stdout=log, stderr=subprocess.STDOUT)
    s = Served(proc, ports, model, log_path)
    try:
        deadline = time.time() + 300
        while "serving model" not in s.log():
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{s.log()[-4000:]}")
            if time.time() > deadline:
                pytest.fail(f"server not ready in time:\n{s.log()[-4000:]}")
            time.sleep(0.5)
        yield s
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
                proc.kill()


def pixels(seed, h=32, w=32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()


def inputs(module, text, image=None, raw=None, **scalars):
    """tritonclient inputs of one request; `raw` = {name: (array, datatype)} for deliberately wrong ones."""
    def tensor(name, array, datatype):
        t = module.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        return t

    out = [tensor("input_text", np.array([[text.encode() if isinstance(text, str) else text]], dtype=np.object_),
                  "BYTES")]
    if image is not None:
        out.append(tensor("input_media", image[np.newaxis, np.newaxis], "UINT8"))
    for name, value in scalars.items():
        datatype, np_type = DTYPES.get(name, ("INT32", np.int32))
        out.append(tensor(name, np.array([[value]], dtype=np_type), datatype))
    for name, (array, datatype) in (raw or {}).items():
        out.append(tensor(name, array, datatype))
    return out


def ask(served, text, image=None, protocol="http", raw=None, **scalars):
    module = tritonclient_grpc if protocol == "grpc" else tritonclient_http
    client = served.client(protocol)
    try:
        result = client.infer(MODEL, inputs(module, text, image, raw, **scalars))
        return result.as_numpy("outputs")[0, 0].decode()
    finally:
        client.close()


def oracle(served, question, image=None, max_new_tokens=LIMITS["max_tokens"], steerlm=None, **sampling):
    ids, strings = serving_stops(served.model, TEMPLATE)
    prompt = build_prompt(TEMPLATE, question, image is not None, steerlm=steerlm)
    pil = Image.fromarray(image) if image is not None else None
    return served.model.generate([pil], [prompt], max_new_tokens=max_new_tokens, stop_token_ids=ids,
                                 stop_strings=strings, **sampling)[0]


def metrics(served) -> dict:
    with urllib.request.urlopen(f"http://{served.metrics}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for name in ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count"):
        found = re.search(rf'^{name}\{{[^}}]*model="{MODEL}"[^}}]*\}} (\S+)$', text, re.M)
        out[name] = float(found.group(1)) if found else None
    return out


# ------------------------------------------------------------------------------------------------- tests
def test_health_metadata_and_config_list_the_inputs(served):
    with urllib.request.urlopen(f"http://{served.http}/v2/health/ready", timeout=30) as r:
        assert r.status == 200
    client = served.client()
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
        meta = client.get_model_metadata(MODEL)
        config = client.get_model_config(MODEL)
    finally:
        client.close()
    found = {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]}
    expected = {"input_text": ("BYTES", [-1, 1]), "input_media": ("UINT8", [-1, -1, -1, -1, 3]),
                "max_output_len": ("INT64", [-1, 1]), "top_k": ("INT64", [-1, 1]), "top_p": ("FP32", [-1, 1]),
                "temperature": ("FP32", [-1, 1]), "repetition_penalty": ("FP32", [-1, 1]),
                "num_beams": ("INT64", [-1, 1]), "batch_size": ("INT64", [-1, 1]),
                "random_seed": ("INT64", [-1, 1]), "input_media_sizes": ("INT64", [-1, -1, 2]),
                **{a: ("INT32", [-1, 1]) for a in ("quality", "toxicity", "humor", "creativity", "violence",
                                                   "helpfulness", "not_appropriate")}}
    assert found == expected
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [("outputs", "BYTES")]
    optional = {i["name"]: i.get("optional", False) for i in config["input"]}
    assert optional.pop("input_text") is False and all(optional.values())
    assert config["max_batch_size"] == 8 and "dynamic_batching" in config
    # the metrics endpoint is up; grpc answers metadata too
    assert metrics(served)["nv_inference_count"] is not None
    grpc = served.client("grpc")
    try:
        assert {i.name for i in grpc.get_model_metadata(MODEL).inputs} == set(expected)
    finally:
        grpc.close()


def test_greedy_answer_equals_generate_and_the_query_script_prints_it(served, tmp_path):
    image = pixels(1, 40, 48)
    expected = oracle(served, "What is it?", image, max_new_tokens=8)
    assert ask(served, "What is it?", image, temperature=0.0, max_output_len=8) == expected
    # NeMo 1's query_multimodal defaults (top_k=1, top_p=0, temperature=1, batch_size=1, ...) are greedy too
    nemo1 = dict(batch_size=1, max_output_len=8, top_k=1, top_p=0.0, temperature=1.0, repetition_penalty=1.0,
                 num_beams=1)
    assert ask(served, "What is it?", image, **nemo1) == expected
    Image.fromarray(image).save(tmp_path / "img.png")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "query_triton.py"), "--url", served.http,
                           "--model", MODEL, "--image", str(tmp_path / "img.png"), "--prompt", "What is it?",
                           "--max-output-len", "8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"


def test_two_images_answer_equals_generate_and_the_query_script_pads_different_sizes(served, tmp_path):
    a, b = pixels(20), pixels(21)
    ids, strings = serving_stops(served.model, TEMPLATE)

    def expected(question, images):
        prompt = build_prompt(TEMPLATE, "\n".join(["<image>"] * len(images) + [question]), True)
        return served.model.generate([[Image.fromarray(im) for im in images]], [prompt], max_new_tokens=8,
                                     stop_token_ids=ids, stop_strings=strings)[0]

    media = np.stack([a, b])[np.newaxis]  # [1, N=2, H, W, 3]
    for protocol in ("http", "grpc"):
        got = ask(served, "Which has more shapes?", protocol=protocol, raw={"input_media": (media, "UINT8")},
                  max_output_len=8)
        assert got == expected("Which has more shapes?", [a, b])
    # two sizes: the script pads them into one tensor and sends input_media_sizes
    c, d = pixels(22, 32, 24), pixels(23, 20, 40)
    Image.fromarray(c).save(tmp_path / "c.png")
    Image.fromarray(d).save(tmp_path / "d.png")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "query_triton.py"), "--url", served.http,
                           "--model", MODEL, "--image", str(tmp_path / "c.png"), "--image", str(tmp_path / "d.png"),
                           "--prompt", "Compare them.", "--max-output-len", "8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    answer = expected("Compare them.", [c, d])
    assert answer and proc.stdout == answer + "\n"


def test_the_query_script_sends_a_video_as_its_frames_and_the_answer_is_generate_of_the_video(served, tmp_path):
    """Triton has no video tensor: `--video` samples the frames with open_video and sends them in input_media
    slots at the prompt's `<video>` tag, which the server turns back into a video (its frames pooled 2x2, as the
    model pools them), so the answer equals `generate` given the `Video` itself."""
    require("av")
    from nemo_neva.data.video_io import VideoSettings, open_video
    from nemo_neva.data.video_writer import write_video

    n = FRAMES  # more than max_images: frames count against max_videos, not max_images
    write_video(tmp_path / "clip.mp4", [pixels(40 + k) for k in range(7)])
    video = open_video(tmp_path / "clip.mp4", VideoSettings(n))
    ids, strings = serving_stops(served.model, TEMPLATE)
    expected = served.model.generate([[video]], [build_prompt(TEMPLATE, "Which way?", False, has_video=True)],
                                     max_new_tokens=8, stop_token_ids=ids, stop_strings=strings)[0]
    script = [sys.executable, os.path.join(ROOT, "scripts", "query_triton.py"), "--url", served.http, "--model", MODEL,
              "--video", str(tmp_path / "clip.mp4"), "--prompt", "Which way?", "--max-output-len", "8"]
    proc = subprocess.run([*script, "--num-frames", str(n)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert expected and proc.stdout == expected + "\n"
    proc = subprocess.run([*script, "--num-frames", str(n + 1)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert (f"input_text has 0 <image> and 1 <video> tag(s), which take {n} input_media slots ({n} frames per "
            f"video, the model's model.data.video.num_frames); got {n + 1}") in proc.stderr


def test_more_images_than_the_limit_are_refused_with_the_count(served):
    media = np.stack([pixels(30 + k) for k in range(LIMITS["max_images"] + 1)])[np.newaxis]
    with pytest.raises(InferenceServerException) as info:
        ask(served, "Too many?", raw={"input_media": (media, "UINT8")})
    assert (f"input 'input_media': {LIMITS['max_images'] + 1} images in one prompt; this server takes at most "
            f"{LIMITS['max_images']} per prompt (limits.max_images)") in info.value.message()
    assert served.proc.poll() is None


def test_text_only_steerlm_and_defaults(served):
    assert ask(served, "Say something.") == oracle(served, "Say something.")  # default: greedy, the server's cap
    assert ask(served, "Say something.", humor=2, quality=5) == oracle(served, "Say something.",
                                                                       steerlm={"humor": 2, "quality": 5})


def test_same_seed_same_answer(served):
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, random_seed=7, max_output_len=8)
    a = ask(served, "Describe the image.", pixels(2), **kw)
    b = ask(served, "Describe the image.", pixels(2), protocol="grpc", **kw)
    assert a == b == oracle(served, "Describe the image.", pixels(2), max_new_tokens=8, temperature=1.0, seed=7)


def test_http_and_grpc_give_the_same_answer(served):
    image = pixels(3)
    assert ask(served, "What colour?", image, protocol="http") == ask(served, "What colour?", image,
                                                                      protocol="grpc")


def test_concurrent_requests_are_batched_and_answered_as_alone(served):
    questions = ["What is it?", "Describe the image.", "What colour is the shape?", "Tell me more.",
                 "What is in the picture?", "Is it round?"]
    expected = [oracle(served, q, pixels(10 + i), max_new_tokens=6) for i, q in enumerate(questions)]
    before = metrics(served)

    def one(i):
        return ask(served, questions[i], pixels(10 + i), protocol="grpc" if i % 2 else "http", max_output_len=6)

    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(one, range(len(questions))))
    after = metrics(served)
    assert answers == expected
    requests = after["nv_inference_request_success"] - before["nv_inference_request_success"]
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    assert requests == len(questions)
    assert executions < requests, f"{requests} requests in {executions} executions: Triton batched none"
    assert re.search(r"answered [2-8] request\(s\) .* in one execution", served.log())


BAD = {
    # refused by Triton itself (dtype / shape / names), before our model sees them
    "temperature_wrong_dtype": (dict(raw={"temperature": (np.array([[1]], np.int32), "INT32")}), "temperature"),
    "media_wrong_dtype": (dict(raw={"input_media": (np.zeros((1, 1, 8, 8, 3), np.float32), "FP32")}),
                          "input_media"),
    "media_four_channels": (dict(raw={"input_media": (np.zeros((1, 1, 8, 8, 4), np.uint8), "UINT8")}),
                            "input_media"),
    "top_k_two_values": (dict(raw={"top_k": (np.array([[1, 2]], np.int64), "INT64")}), "top_k"),
    "unknown_input": (dict(raw={"lora_uids": (np.array([[b"a"]], np.object_), "BYTES")}), "lora_uids"),
    # refused by the model, with the HTTP server's limits and ranges
    "temperature_negative": (dict(temperature=-1.0), "temperature"),
    "top_p_above_one": (dict(top_p=1.5), "top_p"),
    "seed_negative": (dict(random_seed=-3), "random_seed"),
    "beam_search": (dict(num_beams=4), "num_beams"),
    "max_output_len_over_cap": (dict(max_output_len=LIMITS["max_tokens"] + 1), "max_output_len"),
    "image_too_many_pixels": (dict(image=pixels(4, 80, 80)), "input_media"),
    "text_too_long": (dict(text="x" * (LIMITS["max_text_chars"] + 1)), "input_text"),
    "image_tags_not_one_per_image": (dict(text="look: <image> and <image>"), "input_text"),
    "steerlm_out_of_range": (dict(humor=10), "humor"),
    "not_utf8": (dict(text=b"\xff\xfe"), "input_text"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_get_an_error_naming_the_input_and_the_server_goes_on(served, case):
    kwargs, name = dict(BAD[case][0]), BAD[case][1]
    text, image = kwargs.pop("text", "What is it?"), kwargs.pop("image", pixels(5))
    for protocol in ("http", "grpc"):
        with pytest.raises(InferenceServerException) as info:
            ask(served, text, image, protocol=protocol, **kwargs)
        assert f"'{name}'" in info.value.message(), info.value.message()
    assert served.proc.poll() is None
    assert ask(served, "Still there?", pixels(6), max_output_len=2) == oracle(served, "Still there?", pixels(6),
                                                                              max_new_tokens=2)


def test_the_query_script_shows_the_reason(served):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "query_triton.py"), "--url", served.grpc,
                           "--protocol", "grpc", "--prompt", "hi", "--temperature", "-1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == ("error: input 'temperature': temperature=-1.0 is out of range: it must be in "
                                   "[0.0, 2.0]")
    # ... while the server's own log keeps the whole trace, down to the frame in our model that refused it
    # (PyTriton logs it as a warning; tritonserver's Python stub logs only its own frame for it)
    trace = (r"Traceback \(most recent call last\):\n(?:  .*\n)*"
             r"  File \"[^\"]*nemo_neva/serving/triton_model\.py\", line \d+, in __call__\n(?:  .*\n)*"
             r"nemo_neva\.serving\.triton_model\.InvalidInput: input 'temperature': temperature=-1\.0 is out of range")
    assert re.search(trace, served.log()), served.log()[-6000:]


def test_zz_sigterm_shuts_down_cleanly_leaving_no_process(served):
    """Last in the module: it stops the shared server."""
    children = psutil.Process(served.proc.pid).children(recursive=True)
    names = [c.name() for c in children]
    assert "tritonserver" in names and any("stub" in n for n in names), names
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=120) == 0, served.log()[-3000:]
    time.sleep(0.5)
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(c.pid, c.name()) for c in alive]
    assert "shutting down" in served.log()
    with pytest.raises(Exception):
        served.client().is_server_live()
