"""The vision tower + projector as one ONNX graph: pixel values [B,3,H,W] -> image features [B, tokens, hidden].

Input and output are named `input` and `output`, the names TensorRT-LLM's multimodal runner uses for its
vision engine. The batch axis is dynamic; height and width are the image processor's fixed size. The graph's
metadata (`metadata_props`) records how the model's images become that input, as in training:
`nemo_neva.image_aspect_ratio` (square | pad | keep, see nemo_neva.data.image_io.preprocess) and
`nemo_neva.image_pad_colour` (pad's fill, 0-255 RGB).
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from nemo_neva.export.placement import on_module

INPUT, OUTPUT = "input", "output"
MIN_OPSET = 17


class VisionEncoder(nn.Module):
    """What the prompt table is made of: the .nemo model's own `encode_images` path."""

    def __init__(self, tower: nn.Module, projector: nn.Module):
        super().__init__()
        self.tower, self.projector = tower, projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.tower(pixel_values)
        return self.projector(feats.to(next(self.projector.parameters()).dtype))


def image_size(vision_config) -> int:
    return int(vision_config.image_size)


def preprocessing_metadata(model) -> dict:
    from nemo_neva.data.image_io import pad_colour

    return {"nemo_neva.image_aspect_ratio": model.image_aspect_ratio,
            "nemo_neva.image_pad_colour": ",".join(str(c) for c in pad_colour(model.image_processor))}


def _add_metadata(path: str, props: dict) -> None:
    import onnx

    proto = onnx.load(path)
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, path)


def export_vision_onnx(model, path: str, opset: int = MIN_OPSET) -> str:
    """Export `model.model.vision_tower` + projector (an fp32 copy, on the model's device) to `path`."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} < {MIN_OPSET}")
    module = model.model
    if module.vision_tower is None:
        raise ValueError("this model rank holds no vision tower (not the first pipeline stage)")
    # an fp32 copy: the model itself keeps its dtype (a bf16 model stays bf16 for what runs after the export)
    encoder = copy.deepcopy(VisionEncoder(module.vision_tower, module.projector)).float().eval()
    # Eager attention traces to plain MatMul/Softmax, which every ONNX runtime and TensorRT parses.
    encoder.tower.model.set_attn_implementation("eager")
    size = image_size(model.vision_config)
    example = on_module(torch.zeros(2, 3, size, size), encoder)  # the encoder's device (CUDA after restore_from)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(encoder, (example,), path, dynamo=False, opset_version=opset,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, do_constant_folding=True)
    _add_metadata(path, preprocessing_metadata(model))
    return path
