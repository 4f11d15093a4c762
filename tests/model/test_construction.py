"""Build, then parallelise: the config is resolved in one step, the parallel set-up (and the seeding) is the
entry point's or `build_model`'s, and the constructor builds the network only (no process group, no parallel
groups, no reseeding, no data loaders of its own)."""
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from megatron.core import parallel_state as ps
from omegaconf import OmegaConf

from nemo_neva import MegatronNevaModel, build_model
from nemo_neva.models.model_config import resolve_model_config
from nemo_neva.parallel.init import ParallelNotSetUp, setup_parallel
from nemo_neva.training.trainer import NevaSingleDeviceStrategy
from tests.model.helpers import ROOT, tiny_model_cfg


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


def _weights(model):
    return {k: v.clone() for k, v in model.model.state_dict().items() if torch.is_tensor(v)}


def test_the_constructor_draws_from_the_callers_rngs_and_build_model_seeds_them():
    cfg = resolve_model_config(tiny_model_cfg()).cfg
    setup_parallel(cfg)
    first, second = _weights(MegatronNevaModel(cfg)), _weights(MegatronNevaModel(cfg))
    # the constructor does not reseed: the second model's random weights come after the first's draws
    assert any(not torch.equal(first[k], second[k]) for k in first)
    again = _weights(build_model(tiny_model_cfg()))  # seeded with model.seed, like the first after its set-up
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_a_model_asking_for_another_layout_is_refused_in_one_line():
    setup_parallel(resolve_model_config(tiny_model_cfg()).cfg)  # TP=1, this process's only layout
    with pytest.raises(ParallelNotSetUp, match=r"\(TP=2 PP=1\) is not set up.*build_model"):
        MegatronNevaModel(tiny_model_cfg(tensor_model_parallel_size=2))


FRESH_PROCESS = """
import torch.distributed as dist
from megatron.core import parallel_state as ps
from nemo_neva import MegatronNevaModel
from nemo_neva.parallel.init import ParallelNotSetUp
from tests.model.helpers import tiny_model_cfg
try:
    MegatronNevaModel(tiny_model_cfg())
except ParallelNotSetUp as e:
    print("refused:", e)
print("started:", dist.is_initialized(), ps.model_parallel_is_initialized())
"""


def test_constructing_in_a_fresh_process_starts_nothing_and_says_what_to_call():
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: the parallel layout for this model (TP=1 PP=1) is not set up" in proc.stdout
    assert "started: False False" in proc.stdout
