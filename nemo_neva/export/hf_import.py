"""Hugging Face LLaVA / LLaVA-NeXT folder -> MegatronNevaModel / .nemo (`scripts/convert_hf_llava_to_nemo.py`).
A `llava_next` folder becomes a model with `model.mm_cfg.image_tiling` on (its grid pinpoints) and its
learned `image_newline`."""
from __future__ import annotations

import json
import logging
import os

import torch

from nemo_neva.data.image_io import mode_of_hf_processor
from nemo_neva.export.hf_layout import (_LM_HEAD, _NEVA_LM, _NEVA_VISION, _NEWLINE, _NEXT, _PROJ, _PROJECTOR_MAP,
                                        _VISION, _image_token_id, canonical_key, lm_table, nemo_config_from_hf)
from nemo_neva.pretrained import hf_lm
from nemo_neva.pretrained.weights import UnsupportedCheckpoint, open_weights

log = logging.getLogger(__name__)


def _hf_image_processor(input_dir: str, vision_config):
    """The folder's image processor (preprocessor_config.json, or inside processor_config.json)."""
    from transformers import AutoImageProcessor

    from nemo_neva.modules.vision import build_image_processor

    if any(os.path.isfile(os.path.join(input_dir, f)) for f in ("preprocessor_config.json", "processor_config.json")):
        return AutoImageProcessor.from_pretrained(input_dir)
    log.warning("%s has no image processor config: using a default one sized %d", input_dir, vision_config.image_size)
    return build_image_processor(vision_config)


def _tower_processor_of_next(processor, config):
    """A LLaVA-NeXT folder's LlavaNextImageProcessor -> the tower's own processor class with its settings (what a
    NeVA model keeps; `nemo_neva.modules.tiling.processor_for` makes the LlavaNext one back from it and the
    model's pinpoints, which must be the processor's)."""
    from nemo_neva.modules.vision import image_processor_class

    pins = [list(map(int, p)) for p in getattr(processor, "image_grid_pinpoints", None) or []]
    if pins != [list(map(int, p)) for p in config.image_grid_pinpoints]:
        raise UnsupportedCheckpoint(f"the image processor's image_grid_pinpoints {pins} differ from the model "
                                    f"config's {config.image_grid_pinpoints}")
    keys = ("size", "crop_size", "do_center_crop", "image_mean", "image_std", "resample", "rescale_factor",
            "do_rescale", "do_normalize", "do_resize", "do_convert_rgb")
    settings = {k: v for k, v in processor.to_dict().items() if k in keys and v is not None}
    if not settings.get("do_center_crop"):
        settings.pop("crop_size", None)
    return image_processor_class(config.vision_config)(**settings)


def load_hf_llava_into_neva(input_dir: str, trust_pickle: bool = False, make_vocab_size_divisible_by: int = 128):
    """Build a `MegatronNevaModel` holding the weights of a local HF LLaVA directory."""
    from transformers import AutoConfig

    from nemo_neva import build_model
    if not os.path.isfile(os.path.join(input_dir, "config.json")):
        raise FileNotFoundError(f"{input_dir}: no config.json (expected a LlavaForConditionalGeneration folder)")
    with open(os.path.join(input_dir, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in ("llava", _NEXT):
        raise UnsupportedCheckpoint(f"{input_dir}: model_type {model_type!r}; only 'llava' and 'llava_next' "
                                    "are supported")
    config = AutoConfig.from_pretrained(input_dir)
    cfg = nemo_config_from_hf(config, input_dir, make_vocab_size_divisible_by)
    image_processor = _hf_image_processor(input_dir, config.vision_config)
    if model_type == _NEXT:  # tiles and thumbnail come from transformers' LlavaNextImageProcessor (square base)
        if "image_grid_pinpoints" in image_processor.to_dict():
            image_processor = _tower_processor_of_next(image_processor, config)
        cfg.data.image_aspect_ratio = "square"
    else:  # generation then makes the pixels transformers' processor makes (CLIP's shortest edge + crop: keep)
        cfg.data.image_aspect_ratio = mode_of_hf_processor(image_processor)
    source = open_weights(input_dir, trust_pickle, rename=canonical_key)  # fail on weights before building
    where = f"{input_dir}"
    used = hf_lm.check_sources(source, lm_table(cfg), where, _LM_HEAD)
    rest = {k for k in source.names() if k.startswith(_VISION) or k.startswith(_PROJ) or k == _NEWLINE}
    hf_lm.check_leftovers(source, used | rest, where)
    model = build_model(cfg, weights_loaded_after=True)  # every tensor is written below
    if model.image_token_id != _image_token_id(config):
        raise UnsupportedCheckpoint(f"config image_token_index={_image_token_id(config)} but the tokenizer's "
                                    f"'<image>' token is {model.image_token_id}")
    # Keep the checkpoint's own vision config and image processor (not the ones rebuilt from the cfg).
    model.vision_config = config.vision_config
    model.image_processor = image_processor
    hf_lm.load_lm(model.model.language_model, source, lm_table(cfg), where, lm_head=_LM_HEAD)
    target = {k: v for k, v in model.model.state_dict().items() if not k.startswith(_NEVA_LM)
              and torch.is_tensor(v) and not k.endswith("_extra_state")}
    mapped = {}
    for ours, theirs in _PROJECTOR_MAP.items():
        if theirs in source:
            mapped[ours] = source.read(theirs)
        elif theirs.endswith(".bias"):  # multimodal_projector_bias=False is a zero bias here
            mapped[ours] = torch.zeros_like(target[ours])
        else:
            raise UnsupportedCheckpoint(f"checkpoint has no {theirs}")
    for key in sorted(k for k in source.names() if k.startswith(_VISION)):
        mapped[_NEVA_VISION + key[len(_VISION):]] = source.read(key)
    if _NEWLINE in source:
        mapped[_NEWLINE] = source.read(_NEWLINE)
    missing, unexpected = sorted(set(target) - set(mapped)), sorted(set(mapped) - set(target))
    if missing or unexpected:
        raise UnsupportedCheckpoint(f"checkpoint does not match the model: missing={missing[:8]} "
                                    f"unexpected={unexpected[:8]}")
    with torch.no_grad():
        for key, value in mapped.items():
            if tuple(value.shape) != tuple(target[key].shape):
                raise UnsupportedCheckpoint(f"{key}: checkpoint shape {tuple(value.shape)} != model "
                                            f"{tuple(target[key].shape)}")
            target[key].copy_(value.to(target[key].dtype))
    return model


def convert_hf_to_nemo(input_dir: str, output_path: str, trust_pickle: bool = False,
                       make_vocab_size_divisible_by: int = 128) -> str:
    model = load_hf_llava_into_neva(input_dir, trust_pickle, make_vocab_size_divisible_by)
    model.save_to(output_path)
    return output_path
