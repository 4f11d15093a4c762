"""Build the TensorRT engines from an export folder, where TensorRT-LLM / TensorRT are installed.

LLM: `trtllm-build` (or `python -m tensorrt_llm.commands.build`) on llm/, with the prompt embedding table
sized for max_batch_size x max_images_per_request x max_tokens_per_image rows (a tiled model: the count of an
image filling its largest grid).
Vision: the ONNX graph through the TensorRT Python API (or `trtexec`), with a batch optimisation profile for
max_batch_size x max_images_per_request images (a tiled model: x max_tiles tiles each).
Whatever cannot be built here is reported as skipped, with the reason; nothing is faked.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from typing import Optional

from nemo_neva.export.trtllm_prompt import max_prompt_embedding_table_size, max_tokens_per_image

ENGINES_DIR = "engines"
DEFAULT_MAX_INPUT_LEN = 1024
TEXT_ROOM = 512  # prompt text beside the images, in the default --max-input-len of a tiled model


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def default_max_input_len(meta: dict, max_images_per_request: int) -> int:
    """1024, or for a tiled model room for max_images_per_request images of the largest grid + TEXT_ROOM tokens."""
    if not meta.get("image_tiling"):
        return DEFAULT_MAX_INPUT_LEN
    return max(DEFAULT_MAX_INPUT_LEN, max_images_per_request * max_tokens_per_image(meta) + TEXT_ROOM)


def vision_batch(meta: dict, max_batch_size: int, max_images_per_request: int) -> int:
    """Vision-engine inputs of one engine call at most: images, or for a tiled model their tiles."""
    tiles = int(meta["image_tiling"]["max_tiles"]) if meta.get("image_tiling") else 1
    return max_batch_size * max_images_per_request * tiles


def llm_build_command(export_dir: str, meta: dict, max_batch_size: int, max_input_len: int, max_output_len: int,
                      max_images_per_request: int) -> list[str]:
    table = max_prompt_embedding_table_size(max_batch_size, max_images_per_request, max_tokens_per_image(meta))
    exe = shutil.which("trtllm-build")
    base = [exe] if exe else [sys.executable, "-m", "tensorrt_llm.commands.build"]
    return base + [
        "--checkpoint_dir", os.path.join(export_dir, meta["llm_checkpoint"]),
        "--output_dir", os.path.join(export_dir, ENGINES_DIR, "llm"),
        "--max_batch_size", str(max_batch_size),
        "--max_input_len", str(max_input_len),
        "--max_seq_len", str(max_input_len + max_output_len),
        "--max_prompt_embedding_table_size", str(table),
        "--gemm_plugin", "auto",
        "--gather_generation_logits",  # scripts/trtllm_gpu_check.sh compares first-step logits
    ]


def _vision_with_tensorrt(onnx_path: str, engine_path: str, image_size: int, max_batch: int, dtype: str) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; 8.x still needs the flag.
    explicit = 0 if int(trt.__version__.split(".")[0]) >= 10 else \
        1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(explicit)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if dtype == "float16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif dtype == "bfloat16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    shape = (3, image_size, image_size)
    profile.set_shape(name, (1, *shape), (max(1, max_batch // 2), *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError("TensorRT failed to build the vision engine (see its log above)")
    with open(engine_path, "wb") as f:
        f.write(engine)


def _vision_with_trtexec(onnx_path: str, engine_path: str, image_size: int, max_batch: int, dtype: str,
                         input_name: str) -> None:
    dims = f"3x{image_size}x{image_size}"
    cmd = [shutil.which("trtexec"), f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
           f"--minShapes={input_name}:1x{dims}", f"--optShapes={input_name}:{max(1, max_batch // 2)}x{dims}",
           f"--maxShapes={input_name}:{max_batch}x{dims}"]
    cmd += {"float16": ["--fp16"], "bfloat16": ["--bf16"]}.get(dtype, [])
    subprocess.run(cmd, check=True)


def build_engines(export_dir: str, meta: dict, max_batch_size: int = 1, max_input_len: Optional[int] = None,
                  max_output_len: int = 256, max_images_per_request: int = 1) -> tuple[list[str], list[str]]:
    """(built, skipped) descriptions; `max_input_len` None: `default_max_input_len`."""
    if max_input_len is None:
        max_input_len = default_max_input_len(meta, max_images_per_request)
    built, skipped = [], []
    os.makedirs(os.path.join(export_dir, ENGINES_DIR), exist_ok=True)
    if shutil.which("trtllm-build") or _have("tensorrt_llm"):
        cmd = llm_build_command(export_dir, meta, max_batch_size, max_input_len, max_output_len,
                                max_images_per_request)
        subprocess.run(cmd, check=True)
        built.append(f"LLM engine: {os.path.join(export_dir, ENGINES_DIR, 'llm')}")
    else:
        rows = max_prompt_embedding_table_size(max_batch_size, max_images_per_request, max_tokens_per_image(meta))
        skipped.append("LLM engine: neither `trtllm-build` on PATH nor the tensorrt_llm package is available; "
                       f"build it later with: trtllm-build --checkpoint_dir "
                       f"{os.path.join(export_dir, meta['llm_checkpoint'])} --max_prompt_embedding_table_size {rows}")
    onnx_path = os.path.join(export_dir, meta["vision_onnx"])
    engine_path = os.path.join(export_dir, ENGINES_DIR, "vision.engine")
    max_inputs = vision_batch(meta, max_batch_size, max_images_per_request)
    if _have("tensorrt"):
        _vision_with_tensorrt(onnx_path, engine_path, meta["image_size"], max_inputs, meta["dtype"])
        built.append(f"vision engine: {engine_path}")
    elif shutil.which("trtexec"):
        _vision_with_trtexec(onnx_path, engine_path, meta["image_size"], max_inputs, meta["dtype"],
                             meta["vision_input"])
        built.append(f"vision engine: {engine_path}")
    else:
        skipped.append("vision engine: neither the tensorrt package nor `trtexec` is available; build it later "
                       f"from {onnx_path} (input `{meta['vision_input']}`, dynamic batch 1..{max_inputs})")
    return built, skipped
