"""Where the parallel layout is decided: the torch.distributed process group and megatron-core's
model-parallel groups (TP / PP / DP), validated up front with messages that name the fix.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def ensure_distributed(backend: Optional[str] = None, timeout_s: float = 600.0) -> None:
    """Initialise torch.distributed if it is not yet (idempotent).

    Reads the usual launcher variables (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, as set by
    torchrun / SLURM wrappers). Without them it starts a world of one process on a free localhost port.
    The backend is gloo without CUDA and nccl with it, unless `backend` says otherwise.
    """
    from nemo_neva.compat import cpu as compat_cpu

    compat_cpu.install()
    if dist.is_initialized():
        return
    backend = backend or default_backend()
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    if world_size == 1 and "MASTER_PORT" not in env:
        init_method = f"tcp://127.0.0.1:{free_port()}"
    else:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but {', '.join(missing)} is not set; launch with torchrun "
                "(or export MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE)"
            )
        # env:// (not tcp://): under torchrun the agent already hosts the store on MASTER_PORT and the
        # workers must join it as clients (TORCHELASTIC_USE_AGENT_STORE); tcp:// would try to serve it again.
        init_method = "env://"
    if backend == "nccl":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))))
    dist.init_process_group(
        backend=backend, init_method=init_method, rank=rank, world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


class ParallelConfigError(ValueError):
    """A parallel layout that cannot work; the message names the setting to change."""


def validate_parallel_layout(
    tp: int,
    pp: int,
    world_size: int,
    vp: Optional[int] = None,
    cp: int = 1,
    sequence_parallel: bool = False,
    num_attention_heads: Optional[int] = None,
    num_query_groups: Optional[int] = None,
    num_layers: Optional[int] = None,
    cuda_available: Optional[bool] = None,
) -> None:
    """Raise `ParallelConfigError` naming the fix if (tp, pp, vp, cp, sp) cannot run on `world_size` ranks."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("context_parallel_size", cp), ("world size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise ParallelConfigError(f"{name}={value!r} must be a positive integer")
    if world_size % (tp * pp * cp):
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size x pipeline_model_parallel_size"
            f"{' x context_parallel_size' if cp > 1 else ''} = {tp * pp * cp}; launch a multiple of "
            f"{tp * pp * cp} processes (e.g. trainer.devices x trainer.num_nodes = {tp * pp * cp}) or reduce tp/pp"
        )
    if num_attention_heads is not None and num_attention_heads % tp:
        raise ParallelConfigError(
            f"num_attention_heads={num_attention_heads} is not divisible by tensor_model_parallel_size={tp}; "
            f"pick a tensor_model_parallel_size that divides {num_attention_heads}"
        )
    if num_query_groups is not None and num_query_groups % tp:
        raise ParallelConfigError(
            f"num_query_groups={num_query_groups} is not divisible by tensor_model_parallel_size={tp}; "
            f"pick a tensor_model_parallel_size that divides {num_query_groups}"
        )
    if num_layers is not None:
        if num_layers < pp:
            raise ParallelConfigError(
                f"num_layers={num_layers} is smaller than pipeline_model_parallel_size={pp}: every pipeline stage "
                f"needs at least one layer; use pipeline_model_parallel_size <= {num_layers}"
            )
        chunks = pp * (vp or 1)
        if num_layers % chunks:
            what = f"pipeline_model_parallel_size={pp}" + (f" x virtual_pipeline_model_parallel_size={vp}" if vp else "")
            raise ParallelConfigError(
                f"num_layers={num_layers} is not divisible by {what} = {chunks}; choose a "
                f"pipeline_model_parallel_size that divides num_layers"
            )
    if sequence_parallel and tp == 1:
        raise ParallelConfigError(
            "sequence_parallel=True needs tensor_model_parallel_size > 1 (it splits activations across the "
            "tensor-parallel group); set sequence_parallel=false or tensor_model_parallel_size >= 2"
        )
    if vp is not None:
        if vp < 1:
            raise ParallelConfigError(f"virtual_pipeline_model_parallel_size={vp!r} must be a positive integer or null")
        if vp > 1 and pp == 1:
            raise ParallelConfigError(
                "virtual_pipeline_model_parallel_size > 1 needs pipeline_model_parallel_size > 1; "
                "set virtual_pipeline_model_parallel_size=null"
            )
        if vp > 1 and not cuda:
            raise ParallelConfigError(
                "virtual (interleaved) pipeline parallelism is not supported on CPU in nemo_neva; "
                "set virtual_pipeline_model_parallel_size=null (or run on GPUs)"
            )
    if cp > 1 and not cuda:
        raise ParallelConfigError(
            "context_parallel_size > 1 needs Transformer Engine attention on GPUs; set context_parallel_size=1 on CPU"
        )


def _current_layout():
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_virtual_pipeline_model_parallel_world_size(),
        ps.get_context_parallel_world_size(),
    )


def initialize_model_parallel_from_cfg(
    tp: int = 1,
    pp: int = 1,
    world_size: Optional[int] = None,
    vp: Optional[int] = None,
    cp: int = 1,
    sequence_parallel: bool = False,
    num_attention_heads: Optional[int] = None,
    num_query_groups: Optional[int] = None,
    num_layers: Optional[int] = None,
    seed: Optional[int] = 1234,
) -> dict:
    """Validate the layout, then create megatron-core's parallel groups and seed its RNG tracker.

    torch.distributed is initialised first if needed (`ensure_distributed`). `world_size` defaults to the
    process group's; when given it must match. Calling again with the same layout only reseeds; a
    different layout rebuilds the groups (all ranks must call). Returns the effective layout
    (tp, pp, vp, cp, dp, sequence_parallel).
    """
    from megatron.core import parallel_state as ps

    from nemo_neva.compat.cpu import seed_all

    vp = vp if vp and vp > 1 else None
    ensure_distributed()
    actual = dist.get_world_size()
    if world_size is not None and world_size != actual:
        raise ParallelConfigError(
            f"world_size={world_size} was asked for but {actual} processes are running; launch {world_size} "
            "processes (torchrun --nproc-per-node) or drop world_size"
        )
    validate_parallel_layout(tp, pp, actual, vp=vp, cp=cp, sequence_parallel=sequence_parallel,
                             num_attention_heads=num_attention_heads, num_query_groups=num_query_groups,
                             num_layers=num_layers)
    if ps.model_parallel_is_initialized():
        if _current_layout() != (tp, pp, vp, cp):
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vp,
            context_parallel_size=cp,
        )
    if seed is not None:
        seed_all(seed)
    return {"tp": tp, "pp": pp, "vp": vp, "cp": cp, "dp": ps.get_data_parallel_world_size(),
            "sequence_parallel": sequence_parallel}


def _layout_of(cfg) -> dict:
    """The parallel layout a (resolved) `model` config asks for, with what validates it."""
    return dict(
        tp=cfg.get("tensor_model_parallel_size", 1),
        pp=cfg.get("pipeline_model_parallel_size", 1),
        sequence_parallel=cfg.get("sequence_parallel", False),
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.get("num_query_groups") or cfg.num_attention_heads,
        num_layers=cfg.num_layers,
    )


def setup_parallel(cfg) -> dict:
    """torch.distributed and megatron-core's parallel groups for a resolved `model` config
    (`nemo_neva.models.model_config.resolve_model_config`), its RNGs seeded with `model.seed`: what a process
    does once before it builds a MegatronNevaModel. The training commands call it; all ranks must."""
    from nemo_neva.data.settings import seed_of

    return initialize_model_parallel_from_cfg(**_layout_of(cfg), seed=seed_of(cfg))


class ParallelNotSetUp(ParallelConfigError):
    """A model was built in a process whose parallel layout nobody set up (or set up for another layout)."""


def parallel_ready(cfg) -> bool:
    """This process already runs the layout `cfg` asks for (torch.distributed and megatron-core's groups)."""
    from megatron.core import parallel_state as ps

    layout = _layout_of(cfg)
    return dist.is_initialized() and ps.model_parallel_is_initialized() and _current_layout() == (
        layout["tp"], layout["pp"], None, 1)


def require_parallel(cfg) -> None:
    """Check, changing nothing, that `setup_parallel(cfg)` was done: MegatronNevaModel's constructor calls
    this, so building a model starts no process group and no parallel groups of its own."""
    if not parallel_ready(cfg):
        tp, pp = cfg.get("tensor_model_parallel_size", 1), cfg.get("pipeline_model_parallel_size", 1)
        raise ParallelNotSetUp(
            f"the parallel layout for this model (TP={tp} PP={pp}) is not set up in this process: build it with "
            "nemo_neva.build_model(cfg) or call nemo_neva.parallel.init.setup_parallel(cfg) first (all ranks); "
            "restore a .nemo with MegatronNevaModel.restore_from")
    validate_parallel_layout(world_size=dist.get_world_size(), **_layout_of(cfg))


def ensure_parallel(cfg) -> None:
    """`setup_parallel(cfg)` unless this process already runs `cfg`'s layout (then nothing global changes):
    what restoring a .nemo does before the model is built (`MegatronNevaModel.restore_from`, through its
    connector), since the layout is read from the archive's config."""
    if parallel_ready(cfg):
        require_parallel(cfg)  # only checks the layout against cfg
    else:
        setup_parallel(cfg)
