"""Frozen Hugging Face vision tower (CLIP or SigLIP) and the image processor that goes with it."""
from __future__ import annotations

import os
from typing import Optional

import torch
import transformers
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

try:  # the default HF image processors need torchvision; the PIL ones give the same pixels without it
    import torchvision  # noqa: F401

    _PROC_SUFFIX = ""
except ImportError:
    _PROC_SUFFIX = "Pil"


def hf_image_processor_class(name: str):
    """transformers' image processor class `name` (e.g. "CLIPImageProcessor"): its PIL variant without torchvision."""
    return getattr(transformers, name + _PROC_SUFFIX)


CLIPImageProcessor = hf_image_processor_class("CLIPImageProcessor")
SiglipImageProcessor = hf_image_processor_class("SiglipImageProcessor")

_TOWERS = {
    "clip": (CLIPVisionConfig, CLIPVisionModel, CLIPImageProcessor, True),
    "siglip": (SiglipVisionConfig, SiglipVisionModel, SiglipImageProcessor, False),
}


def _tower_kind(config) -> str:
    kind = getattr(config, "model_type", "")
    if kind in ("clip_vision_model", "clip"):
        return "clip"
    if kind in ("siglip_vision_model", "siglip"):
        return "siglip"
    raise ValueError(f"unsupported vision tower model_type {kind!r}: expected a CLIP or SigLIP vision model")


def image_processor_class(config):
    """The HF image processor class that goes with a CLIP / SigLIP vision config."""
    return _TOWERS[_tower_kind(config)][2]


def load_vision_config(from_pretrained: Optional[str], model_type: str, overrides: Optional[dict]):
    """Vision config from a local HF directory, or a fresh one (random init) of `model_type`."""
    if from_pretrained:
        if not os.path.isdir(from_pretrained):
            raise FileNotFoundError(
                f"model.mm_cfg.vision_encoder.from_pretrained={from_pretrained!r} is not a local directory"
            )
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(from_pretrained)
        config = getattr(config, "vision_config", config)  # a full CLIPModel dir also works
        _tower_kind(config)
        return config
    if model_type not in _TOWERS:
        raise ValueError(f"vision_encoder.model_type must be one of {sorted(_TOWERS)}, got {model_type!r}")
    return _TOWERS[model_type][0](**(overrides or {}))


def tower_features(config, drop_cls: bool = True) -> int:
    """Features the tower gives per image: its patches, + the CLS token where it has one and keeps it."""
    keeps_cls = _TOWERS[_tower_kind(config)][3] and not drop_cls
    return (config.image_size // config.patch_size) ** 2 + (1 if keeps_cls else 0)


def tokens_per_image(config, drop_cls: bool = True, projector: str = "linear", frame_pool=None) -> int:
    """Image placeholder tokens one image becomes (known on every pipeline stage, tower or not):
    the tower's patch (+ CLS) features, as many as the projector `projector` turns them into. With a
    `frame_pool` (`nemo_neva.modules.frame_pool`): the tokens of one pooled video frame."""
    from nemo_neva.modules.projector import projected_tokens

    patches = (config.image_size // config.patch_size) ** 2
    keeps_cls = tower_features(config, drop_cls) > patches
    if keeps_cls and projector == "mlp_downsample":
        raise ValueError("mm_mlp_adapter_type=mlp_downsample merges a square patch grid and cannot keep the CLS "
                         "token; set model.mm_cfg.vision_encoder.drop_cls=true")
    if frame_pool is not None:
        return projected_tokens(projector, frame_pool.tokens(tower_features(config, drop_cls)))
    return projected_tokens(projector, patches) + (1 if keeps_cls else 0)


class VisionTower(nn.Module):
    """Runs the HF vision model and returns patch features from `select_layer` (CLS dropped if asked)."""

    def __init__(self, config, from_pretrained: Optional[str] = None, select_layer: int = -2, drop_cls: bool = True):
        super().__init__()
        kind = _tower_kind(config)
        model_cls = _TOWERS[kind][1]
        self.has_cls = _TOWERS[kind][3]
        if from_pretrained:
            self.model = model_cls.from_pretrained(from_pretrained, config=config, torch_dtype=torch.float32)
        else:
            self.model = model_cls(config)
        self.select_layer = select_layer
        self.drop_cls = drop_cls and self.has_cls
        n_layers = config.num_hidden_layers
        if not -(n_layers + 1) <= select_layer <= n_layers:
            raise ValueError(f"vision_select_layer={select_layer} out of range for a {n_layers}-layer tower")

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def features_per_image(self) -> int:
        return tower_features(self.model.config, self.drop_cls)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        if self.drop_cls:
            feats = feats[:, 1:]
        return feats


def build_image_processor(config, from_pretrained: Optional[str] = None):
    """The tower's own HF image processor: loaded from the local dir, or sized to the config."""
    kind = _tower_kind(config)
    proc_cls = _TOWERS[kind][2]
    if from_pretrained and os.path.isfile(os.path.join(from_pretrained, "preprocessor_config.json")):
        return proc_cls.from_pretrained(from_pretrained)
    size = config.image_size
    if kind == "clip":
        return proc_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return proc_cls(size={"height": size, "width": size})
