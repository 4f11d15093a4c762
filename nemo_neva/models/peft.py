"""Parameter-efficient finetuning (`model.peft.*`): LoRA on the LM, base weights and vision frozen.

A PEFT `.nemo` holds only the adapter and projector weights (with a tiled model's `image_newline`). Its
config names the full `.nemo` it was trained from (`peft.base_nemo_path`) with that file's SHA-256
(`peft.base_nemo_sha256`), recorded when training started from it. Restoring a PEFT `.nemo` loads the base's weights first (after checking the
checksum and the archive, as for any untrusted `.nemo`), then the adapters and projector on top.
`scripts/merge_lora.py` folds the adapters into the base weights and writes a full `.nemo`.

    model.peft.peft_scheme        lora | null (no PEFT)
    model.peft.lora.{rank,alpha,dropout,target_modules}
    model.peft.train_projector    the projector (and a tiled model's image_newline, as LLaVA-NeXT trains it with
                                  the projector) learns too (true) or stays as in the base (false)
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from omegaconf import open_dict

from nemo_neva.checkpoint.peft_files import (
    base_weights_dir,
    check_base_reference,
    is_adapter_key,
    is_peft_key,
    sha256_of,
)
from nemo_neva.data.settings import seed_of
from nemo_neva.modules import lora
from nemo_neva.modules.lora import lora_settings

log = logging.getLogger(__name__)

def apply(module, cfg) -> None:
    """Wrap the LM's targeted linear layers of NevaModule `module` with LoRA adapters (if PEFT is on)."""
    settings = lora_settings(cfg)
    if settings is None:
        return
    gpt = module.language_model
    n = lora.wrap_linear_layers(gpt, gpt.config, settings["targets"], settings["rank"], settings["alpha"],
                                settings["dropout"], seed=seed_of(cfg))
    if n == 0:
        raise ValueError(f"model.peft.lora.target_modules={settings['targets']} matched no layer")


def freeze(module, cfg) -> None:
    """PEFT: only the adapters (and the projector, with `peft.train_projector`) learn."""
    if lora_settings(cfg) is None:
        return
    if not cfg.mm_cfg.llm.get("freeze", True):
        log.info("PEFT: the LM's base weights stay frozen (model.mm_cfg.llm.freeze=false is ignored)")
    for name, p in module.language_model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in lora.ADAPTER_PARAMS)
    if module.projector is not None:
        for p in module.projector.parameters():
            p.requires_grad_(bool(cfg.peft.get("train_projector", True)))
    if getattr(module, "image_newline", None) is not None:  # anyres: learns (and is stored) with the projector
        module.image_newline.requires_grad_(bool(cfg.peft.get("train_projector", True)))


def restore_weights(model, restore_dir: str, archive: Optional[str]) -> None:
    """Load the weights of the .nemo being restored into `model`.

    * no PEFT: all weights from the archive;
    * PEFT config, full archive (starting PEFT from a stage-1/2 .nemo): base weights from it, adapters keep
      their initialisation (B = 0), and the archive is recorded as the base;
    * PEFT archive (its config names a base): base weights from the base .nemo, then adapters + projector.
    """
    from nemo_neva.checkpoint.nemo_layout import WEIGHTS_DIR

    own = os.path.join(restore_dir, WEIGHTS_DIR)
    if lora_settings(model.cfg) is None:
        model._load_dist_weights(own)
        return
    peft = model.cfg.peft
    if peft.get("base_nemo_path"):
        check_base_reference(model.cfg)
        with base_weights_dir(peft.base_nemo_path) as base_dir:
            model._load_dist_weights(base_dir, keep=lambda k: not is_adapter_key(k))
        model._load_dist_weights(own, keep=is_peft_key)
        return
    model._load_dist_weights(own, keep=lambda k: not is_adapter_key(k))
    if not archive or not os.path.isfile(archive):
        raise ValueError("PEFT training must start from a .nemo file (it becomes the adapters' base), "
                         f"got {archive!r}")
    with open_dict(model.cfg):
        peft.base_nemo_path = os.path.abspath(archive)
        peft.base_nemo_sha256 = sha256_of(archive)


# ------------------------------------------------------------------------------------------ merge
def merge(model) -> int:
    """Fold the adapters into the base weights; the model becomes a plain (non-PEFT) NeVA model."""
    if lora_settings(model.cfg) is None:
        raise ValueError("this model has no LoRA adapters (model.peft.peft_scheme is not lora)")
    n = lora.merge_and_unwrap(model.model)
    with open_dict(model.cfg):
        model.cfg.pop("peft")
    return n
