"""The LR schedule decays over the steps the run really takes: trainer.max_steps, or for an epoch-based run
(max_steps=-1) max_epochs x optimizer steps per epoch (whichever ends first); a run without an end is refused."""
import json

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf

from tests.model.helpers import tiny_model_cfg

SAMPLES, GLOBAL = 16, 8  # 2 optimizer steps per epoch


def _cfg(tmp_path, max_steps, max_epochs, **model_overrides):
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"id": f"t{i}", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "red " * (1 + i % 3)}]} for i in range(SAMPLES)]))
    model = tiny_model_cfg(**{"data.data_path": str(data), "global_batch_size": GLOBAL, "micro_batch_size": 4,
                              "optim.sched.warmup_steps": 1, **model_overrides})
    trainer = {"devices": 1, "num_nodes": 1, "accelerator": "cpu", "precision": 32, "max_steps": max_steps,
               "max_epochs": max_epochs, "logger": False, "enable_checkpointing": False, "limit_val_batches": 0,
               "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
               "log_every_n_steps": 1}
    return OmegaConf.create({"trainer": trainer, "model": OmegaConf.to_container(model)})


class _StopEndlessRun(pl.Callback):
    """A run that should have been refused must not train forever (it did, before the refusal)."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= 20:
            raise RuntimeError("still training after 20 steps")


def _fit(cfg):
    from nemo_neva import build_model
    from nemo_neva.training.trainer import build_trainer

    trainer = build_trainer(cfg)
    trainer.callbacks.append(_StopEndlessRun())
    model = build_model(cfg.model, trainer=trainer)
    trainer.fit(model)
    return trainer, model.optimizers(use_pl_optimizer=False)


def test_epoch_based_run_decays_over_epochs_times_steps_per_epoch(tmp_path):
    trainer, opt = _fit(_cfg(tmp_path, max_steps=-1, max_epochs=2))
    assert trainer.global_step == 4
    assert opt.scheduler.lr_decay_steps == 4  # 2 epochs x (16 samples / global batch 8), not 1000
    # the cosine has run its course: the last step's LR is min_lr (cos(pi) in float: approx's default 1e-6)
    assert opt.param_groups[0]["lr"] == pytest.approx(float(trainer.lightning_module.cfg.optim.sched.min_lr))


def test_steps_and_epochs_whichever_ends_first_and_an_explicit_length(tmp_path):
    _, opt = _fit(_cfg(tmp_path, max_steps=3, max_epochs=2))
    assert opt.scheduler.lr_decay_steps == 3
    _, opt = _fit(_cfg(tmp_path, max_steps=-1, max_epochs=1, **{"optim.sched.max_steps": 50}))
    assert opt.scheduler.lr_decay_steps == 50


def test_a_run_without_an_end_is_refused(tmp_path):
    with pytest.raises(ValueError, match="LR schedule needs the run's length"):
        _fit(_cfg(tmp_path, max_steps=-1, max_epochs=-1))
    torch.distributed.barrier()  # the process group is still usable after the refusal
