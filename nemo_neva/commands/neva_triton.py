"""Serve a .nemo NeVA model through Triton Inference Server (PyTriton), with NeMo 1's multimodal inputs.

    neva-triton neva_model_file=M.nemo triton.model_name=neva triton.http_port=8000 \
        triton.grpc_port=8001 triton.metrics_port=8002
    neva-query-triton --url 127.0.0.1:8000 --model neva --image cat.png --prompt "What is this?"
    neva-query-triton --image a.png --image b.png --prompt "Which has more shapes?"   # N = 2

Runs until SIGINT/SIGTERM, then shuts Triton down cleanly. GPU: `trt_engine_dir=EXPORT` (the folder of
scripts/export_to_trtllm.py --build) serves the TensorRT engines instead; needs TensorRT-LLM.
"""
from nemo_neva.cli import quiet_logs

quiet_logs()  # before NeMo / megatron-core are imported

import logging
import os
import sys

from nemo.core.config import hydra_runner


from nemo_neva.data.conversation import get_template
from nemo_neva.serving.limits import ServerLimits
from nemo_neva.serving import triton_env
from nemo_neva.serving.triton_env import TritonEnvError
from nemo_neva.serving.triton_model import NevaTritonModel, TorchBackend
from nemo_neva.serving.triton_server import TritonSettings, serve
from nemo_neva.cli import CONF_DIR, user_errors


def _ready(s: TritonSettings, template: str, backend: str) -> None:
    urls = s.urls()
    print(f"serving model {s.model_name!r} ({backend}, template {template}) through Triton: HTTP {urls['http']}, "
          f"gRPC {urls['grpc']}, metrics {urls['metrics']}", flush=True)


@hydra_runner(config_path=CONF_DIR, config_name="neva_triton")
@user_errors
def main(cfg) -> None:
    settings = TritonSettings.from_cfg(cfg.triton)  # config mistakes show before anything loads
    limits = ServerLimits.from_cfg(cfg.limits, section="limits")
    if cfg.conv_template:
        get_template(cfg.conv_template)
    try:
        triton_env.prepare(settings.stub_env)  # environment problems show before the model loads
    except TritonEnvError as e:
        raise ValueError(str(e)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if cfg.trt_engine_dir:
        from nemo_neva.serving.triton_trtllm import TrtllmBackend

        backend = TrtllmBackend.from_export_dir(cfg.trt_engine_dir)  # refused clearly without TensorRT-LLM
        template = cfg.conv_template or backend.template
    else:
        if not cfg.neva_model_file:
            raise ValueError("neva_model_file=... is required (or trt_engine_dir=... on a GPU with TensorRT-LLM)")
        from nemo_neva import MegatronNevaModel

        model = MegatronNevaModel.restore_from(cfg.neva_model_file)
        template = cfg.conv_template or model.cfg.data.conv_template
        backend = TorchBackend(model, template)
    try:
        serve(NevaTritonModel(backend, template, limits), settings,
              on_ready=lambda s: _ready(s, template, backend.name))
    except TritonEnvError as e:
        raise ValueError(str(e)) from None


if __name__ == "__main__":
    main()
