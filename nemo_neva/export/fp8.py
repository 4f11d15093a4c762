"""Per-tensor FP8 (E4M3) pieces shared by the TensorRT-LLM checkpoint export (trtllm_fp8.py) and the Hugging Face
FP8 export (hf_fp8.py): the scale rule, the cast, and the activation calibration (amax of each linear's input,
measured with forward pre-hooks while the .nemo model runs over calibration samples; fp32 on CPU is fine)."""
from __future__ import annotations

import logging
from typing import Iterable

import torch

from nemo_neva.export.placement import on_module

log = logging.getLogger(__name__)

FP8_MAX = 448.0  # largest finite float8_e4m3fn
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # keeps an all-zero tensor from dividing by zero


def scale_of(amax: torch.Tensor) -> torch.Tensor:
    """The per-tensor scale that maps amax onto the largest finite E4M3 value (float32)."""
    return (amax.float() / FP8_MAX).clamp(min=MIN_SCALE)


def to_fp8(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """t / scale rounded to float8_e4m3fn (round to nearest even), saturated at +-448."""
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous()


def decoder_linears(module) -> dict[tuple[int, str], torch.nn.Module]:
    """(layer, kind) -> the megatron-core linear of a NevaModule's LM decoder, kind: qkv, proj (attention output),
    fc1 (MLP up, and gate for SwiGLU), fc2 (MLP down). Their inputs are the inputs the engines' linears see."""
    found = {}
    for i, layer in enumerate(module.language_model.decoder.layers):
        qkv = layer.self_attention.linear_qkv
        if hasattr(qkv, "layer_norm_weight"):
            raise ValueError("FP8 calibration needs the separate layer norms of the local layer spec; this model "
                             "uses Transformer Engine's fused LayerNorm+Linear (model.transformer_engine=true)")
        found[(i, "qkv")] = qkv
        found[(i, "proj")] = layer.self_attention.linear_proj
        found[(i, "fc1")] = layer.mlp.linear_fc1
        found[(i, "fc2")] = layer.mlp.linear_fc2
    return found


@torch.no_grad()
def record_input_amax(model, modules: dict, batches: Iterable[dict]) -> dict:
    """amax(|input|) of each of `modules` (name -> a module of `model.model`) over `batches` (collated dicts with
    tokens, position_ids, images; a tiled model's also image_sizes), as host float32 scalars."""
    amax: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_module, args):
            value = args[0].detach().float().abs().amax()
            amax[name] = torch.maximum(amax[name], value) if name in amax else value
        return hook

    hooks = [mod.register_forward_pre_hook(record(name)) for name, mod in modules.items()]
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            # the collator's host tensors on the model's device; pixel values in the vision tower's dtype
            batch = on_module(batch, model.model.vision_tower if model.model.vision_tower is not None
                              else model.model)
            model.model(batch["tokens"], batch["position_ids"], images=batch.get("images"),
                        num_images=batch.get("num_images"), image_sizes=batch.get("image_sizes"),
                        video_frames=batch.get("video_frames"))
            n += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ValueError("FP8 calibration got no usable samples")
    log.info("FP8 calibration: %d samples", n)
    return {name: value.cpu() for name, value in amax.items()}  # the weights they scale are on the host


def calibration_batches(model, data_path: str, image_folder, num_samples: int):
    """Samples of a LLaVA-format JSON (+ image folder), encoded exactly as training encodes them."""
    from omegaconf import OmegaConf, open_dict

    from nemo_neva.data.collate import NevaCollator

    data_cfg = OmegaConf.create(OmegaConf.to_container(model.cfg.data, resolve=True)) if model.cfg.get("data") \
        else OmegaConf.create({})
    with open_dict(data_cfg):
        data_cfg.data_path = data_path
        data_cfg.image_folder = image_folder
        data_cfg.strict = False
    dataset = model.build_dataset(data_cfg, data_path)
    collate = NevaCollator(pad_id=model.tokenizer.pad_token_id)
    taken = 0
    for idx in range(len(dataset)):
        if taken >= num_samples:
            return
        item = dataset[idx]
        if item is None:
            continue
        taken += 1
        yield collate([item])
