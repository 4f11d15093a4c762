"""One server for all serving tests: a tiny random .nemo, served by examples/neva_serve.py on a free localhost port."""
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from nemo_neva import build_model
from nemo_neva.parallel.init import free_port
from tests.model.helpers import ROOT, tiny_model_cfg
from tests.serving.serving_helpers import LIMITS, TEMPLATE, Served


def _wait_healthy(url, proc, log_path, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            with open(log_path) as f:
                pytest.fail(f"server exited with {proc.returncode}:\n{f.read()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail("server did not become healthy in time")


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    path = str(folder / "tiny-neva.nemo")
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(encoder_seq_length=192))
    model.save_to(path)
    model.eval()
    port = free_port()
    log_path = str(folder / "server.log")
    args = [sys.executable, os.path.join(ROOT, "examples", "neva_serve.py"), f"neva_model_file={path}",
            f"server.port={port}", f"conv_template={TEMPLATE}", *[f"server.{k}={v}" for k, v in LIMITS.items()]]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=str(folder), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log_path)
        yield Served(url, "tiny-neva", model, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
