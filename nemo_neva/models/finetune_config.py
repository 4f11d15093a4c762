"""Model configs built from a `.nemo`: the stage-2 (and PEFT) config is the stage-1 `.nemo`'s own model
config with the finetuning keys laid over it."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_neva.models.neva_model import MegatronNevaModel


def finetune_config(restore_path: str, overrides: DictConfig) -> DictConfig:
    """The .nemo's own model config with the finetuning keys laid over it."""
    base = MegatronNevaModel.restore_from(restore_path, return_config=True)
    extra = OmegaConf.to_container(overrides, resolve=True)
    extra.pop("restore_from_path", None)
    for block in ("mm_cfg", "data"):  # null keys of mm_cfg.video / data.video keep the .nemo's (pooling, frames)
        video = (extra.get(block) or {}).get("video")
        if isinstance(video, dict):
            for key in [k for k, v in video.items() if v is None]:
                video.pop(key)
    merged = OmegaConf.merge(base, extra)
    with open_dict(merged):
        merged.target = "nemo_neva.models.neva_model.MegatronNevaModel"
    return merged
