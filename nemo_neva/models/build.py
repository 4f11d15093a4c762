"""`build_model`: the one explicit call that builds a fresh MegatronNevaModel in a script, a tool or a test — the
config resolved, this process's parallel layout set up for it (RNGs seeded with `model.seed`, so the random
weights follow it), then the network built. The constructor itself only checks that the layout is in place;
entry points that set the layout up before making their trainer (neva-pretrain) take the same steps in order."""
from __future__ import annotations

from typing import Optional

from lightning.pytorch import Trainer
from omegaconf import DictConfig

from nemo_neva.models.model_config import resolve_model_config
from nemo_neva.models.neva_model import MegatronNevaModel
from nemo_neva.parallel.init import setup_parallel


def build_model(cfg: DictConfig, trainer: Optional[Trainer] = None, **kwargs) -> MegatronNevaModel:
    """A new MegatronNevaModel from a `model` config as written; `kwargs` go to its constructor. All ranks
    must call it (the parallel set-up is collective)."""
    resolved = resolve_model_config(cfg).cfg
    setup_parallel(resolved)
    return MegatronNevaModel(resolved, trainer=trainer, **kwargs)
