"""The config a MegatronNevaModel is built from, resolved in one step before anything is built: the parallel
layout fitted to the world, `model.data.image_aspect_ratio` recorded, the pretrained LM's shape filled in."""
from __future__ import annotations

import copy
import logging
import os
from typing import NamedTuple, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_neva import pretrained

log = logging.getLogger(__name__)


class ResolvedConfig(NamedTuple):
    """The resolved `model` config (a copy: the caller's is left as it was) and where the pretrained LM's
    weights load from (None without `llm.from_pretrained`, and on a restore)."""

    cfg: DictConfig
    lm_source: Optional[pretrained.LMSource]


def world_size() -> int:
    """Processes of this run: the process group's, else the launcher's WORLD_SIZE (1 without a launcher)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else int(
        os.environ.get("WORLD_SIZE", "1"))


def resolve_model_config(cfg: DictConfig, restoring: bool = False) -> ResolvedConfig:
    """`cfg` (a `model` config) as the network is built from it; `restoring`: it is a .nemo's config (NeMo is
    restoring it), whose LM shape is already in it and whose layout may be reshaped to a single process.
    Reads the pretrained LM's config and tokenizer (`pretrained.resolve`); starts nothing, changes no global
    state. The training commands call it before `nemo_neva.parallel.init.setup_parallel`; the model's
    constructor calls it again (it is idempotent) for callers that hand it a config as written."""
    from nemo_neva.data.image_io import aspect_ratio_of

    cfg = copy.deepcopy(cfg) if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    tp = cfg.get("tensor_model_parallel_size", 1)
    pp = cfg.get("pipeline_model_parallel_size", 1)
    with open_dict(cfg):
        if restoring and world_size() == 1 and tp * pp > 1:  # megatron-core reshards the weights on load
            log.warning("restoring a TP=%d PP=%d checkpoint on one process: using TP=1 PP=1", tp, pp)
            cfg.tensor_model_parallel_size = 1
            cfg.pipeline_model_parallel_size = 1
            cfg.sequence_parallel = False
        # always in the config, so in every .nemo written from it: the one preprocessing every image path uses;
        # an older .nemo without it restores with the default it was trained with (`square`)
        mode = aspect_ratio_of(cfg)  # refuses an unknown mode before anything is built
        if cfg.get("data") is None:
            cfg.data = {}
        cfg.data.image_aspect_ratio = mode
    # model.mm_cfg.llm.from_pretrained: the LM's shape into the config, its tokenizer, its weights checked
    lm_source = None if restoring else pretrained.resolve(cfg)
    return ResolvedConfig(cfg, lm_source)
