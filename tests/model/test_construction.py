"""Build, then parallelise: the config is resolved in one step, the parallel set-up is the entry point's, and
the constructor builds the network only (no process group, no parallel groups, no data loaders of its own)."""
import lightning.pytorch as pl
import torch
from megatron.core import parallel_state as ps
from omegaconf import OmegaConf

from nemo_neva import MegatronNevaModel
from nemo_neva.models.model_config import resolve_model_config
from nemo_neva.parallel.init import setup_parallel
from nemo_neva.training.trainer import NevaSingleDeviceStrategy
from tests.model.helpers import tiny_model_cfg


def test_resolving_leaves_the_callers_config_as_it_was():
    cfg = tiny_model_cfg()
    OmegaConf.update(cfg, "data.image_aspect_ratio", None, merge=True)
    before = OmegaConf.to_yaml(cfg)
    resolved, lm_source = resolve_model_config(cfg)
    assert OmegaConf.to_yaml(cfg) == before
    assert resolved.data.image_aspect_ratio == "square" and lm_source is None


def test_a_restore_on_one_process_takes_the_single_process_layout():
    cfg = tiny_model_cfg(tensor_model_parallel_size=2, sequence_parallel=True)
    resolved = resolve_model_config(cfg, restoring=True).cfg
    assert (resolved.tensor_model_parallel_size, resolved.sequence_parallel) == (1, False)
    assert resolve_model_config(cfg).cfg.tensor_model_parallel_size == 2  # a fresh model keeps what was asked


def test_the_constructor_keeps_the_entry_points_parallel_state_and_builds_no_loaders():
    cfg = resolve_model_config(tiny_model_cfg()).cfg
    setup_parallel(cfg)
    group = ps.get_tensor_model_parallel_group()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=NevaSingleDeviceStrategy(torch.device("cpu")),
                         logger=False, enable_checkpointing=False, max_steps=1)
    model = MegatronNevaModel(cfg, trainer=trainer)
    assert ps.get_tensor_model_parallel_group() is group  # the same groups, not rebuilt
    assert model.train_dataloader() is None  # Lightning asks for them: setup("fit")
    model.setup("fit")
    batch = next(iter(model.train_dataloader()))
    assert batch["tokens"].shape[0] == cfg.global_batch_size
