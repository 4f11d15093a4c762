"""A NeVA model behind a real Triton Inference Server, through PyTriton (`examples/neva_triton.py`).

PyTriton starts the `tritonserver` it bundles (HTTP, gRPC and metrics endpoints, Triton's dynamic batcher)
and a Python-backend stub that hands each batch of requests to `NevaTritonModel` in this process. All three
endpoints bind 127.0.0.1 unless configured otherwise; PyTriton also keeps Triton's non-inference APIs
(shared memory, model repository, statistics, trace, logging) behind a token it generates per start.
Health (`/v2/health/ready`), model metadata/config and `/metrics` stay open on the bound address.
"""
from __future__ import annotations

import logging
import re
import signal
import threading
from dataclasses import dataclass, fields
from typing import Callable, Optional

from nemo_neva.serving import triton_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TritonSettings:
    model_name: str = "neva"
    http_address: str = "127.0.0.1"
    http_port: int = 8000
    grpc_address: str = "127.0.0.1"
    grpc_port: int = 8001
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 8002
    max_batch_size: int = 8          # rows per execution (Triton's dynamic batcher fills it)
    max_queue_delay_ms: float = 10   # how long Triton holds a request for others to batch with
    exit_timeout_s: int = 10         # on shutdown: wait this long for requests in flight
    log_verbose: int = 0             # tritonserver's --log-verbose
    stub_env: Optional[str] = None   # NumPy-1 environment of the backend stub; None = <venv>/triton-stub-env

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", str(self.model_name)):
            raise ValueError(f"triton.model_name={self.model_name!r}: letters, digits, '.', '_' and '-' only")
        ports = {k: getattr(self, k) for k in ("http_port", "grpc_port", "metrics_port")}
        for key, port in ports.items():
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise ValueError(f"triton.{key}={port!r} must be a port number 1-65535")
        if len(set(ports.values())) != len(ports):
            raise ValueError(f"triton http/grpc/metrics ports must differ, got {ports}")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"triton.max_batch_size={self.max_batch_size!r} must be an integer >= 1")
        if not self.max_queue_delay_ms >= 0:
            raise ValueError(f"triton.max_queue_delay_ms={self.max_queue_delay_ms!r} must be >= 0")
        if not isinstance(self.exit_timeout_s, int) or self.exit_timeout_s < 0:
            raise ValueError(f"triton.exit_timeout_s={self.exit_timeout_s!r} must be an integer >= 0")

    @classmethod
    def from_cfg(cls, cfg) -> "TritonSettings":
        unknown = sorted(set(cfg) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown triton.* setting(s): {', '.join(unknown)}")
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg and cfg[f.name] is not None})

    def urls(self) -> dict:
        return {"http": f"{self.http_address}:{self.http_port}", "grpc": f"{self.grpc_address}:{self.grpc_port}",
                "metrics": f"http://{self.metrics_address}:{self.metrics_port}/metrics"}


def _triton_config(s: TritonSettings):
    from pytriton.triton import TritonConfig

    return TritonConfig(http_address=s.http_address, http_port=s.http_port, grpc_address=s.grpc_address,
                        grpc_port=s.grpc_port, metrics_address=s.metrics_address, metrics_port=s.metrics_port,
                        allow_metrics=True, allow_gpu_metrics=False, exit_timeout_secs=s.exit_timeout_s,
                        log_verbose=s.log_verbose, allow_sagemaker=False, allow_vertex_ai=False)


def bind(triton, model, s: TritonSettings) -> None:
    """Declare `model` (a NevaTritonModel) on a PyTriton `Triton`, with Triton's dynamic batcher."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    from nemo_neva.serving.triton_model import OUTPUT

    inputs = [Tensor(name=i.name, dtype=i.dtype, shape=i.shape, optional=i.optional) for i in model.inputs]
    outputs = [Tensor(name=OUTPUT.name, dtype=OUTPUT.dtype, shape=OUTPUT.shape)]
    config = ModelConfig(max_batch_size=s.max_batch_size,
                         batcher=DynamicBatcher(max_queue_delay_microseconds=int(s.max_queue_delay_ms * 1000)))
    # One instance: the model is not thread-safe; batching is how requests share it.
    triton.bind(model_name=s.model_name, infer_func=model, inputs=inputs, outputs=outputs, config=config,
                strict=True)


def serve(model, s: TritonSettings, on_ready: Optional[Callable[[TritonSettings], None]] = None,
          stop: Optional[threading.Event] = None) -> None:
    """Run the Triton server until SIGINT/SIGTERM (or `stop` is set), then shut it down cleanly: requests in
    flight get `exit_timeout_s` to finish, tritonserver and its stub exit, PyTriton's workspace is removed."""
    prepared = triton_env.prepare(s.stub_env)
    log.info("PyTriton environment: %s", prepared)
    from pytriton.triton import Triton

    stop = stop or threading.Event()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda *_: stop.set())
    triton = None
    try:
        triton = Triton(config=_triton_config(s))
        bind(triton, model, s)
        triton.run()
        if on_ready is not None:
            on_ready(s)
        while not stop.wait(1.0):
            if not triton.is_alive() and not stop.wait(1.0):
                raise RuntimeError("the Triton server stopped unexpectedly (see the log above)")
        log.info("shutting down")
    finally:
        if triton is not None:
            triton.stop()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
