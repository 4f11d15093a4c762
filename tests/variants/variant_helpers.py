"""Shared by the model-variant tests: a few real optimizer steps, and a .nemo round trip."""
import torch

from nemo_neva import MegatronNevaModel
from tests.model.helpers import batch_for


def variant_batch(model, n=2, seq=40, seed=0):
    """`batch_for` with images at the tower's own resolution."""
    batch = batch_for(model, n=n, seq=seq, seed=seed)
    size = model.vision_config.image_size
    batch["images"] = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return batch


def train_steps(model, steps=3):
    """Optimizer steps through megatron-core's DDP, schedule and optimizer; returns the losses."""
    model.train()
    opt = model.configure_optimizers()
    losses = [float(model.train_on_batch(variant_batch(model, n=model.cfg.global_batch_size, seed=i), opt))
              for i in range(steps)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    return losses


def logits_of(model, batch):
    model.eval()
    with torch.no_grad():
        return model(batch["tokens"], batch["position_ids"], images=batch["images"])


def assert_nemo_roundtrip(model, path):
    """Save, restore, and get bit-identical logits; returns the restored model."""
    batch = variant_batch(model, seed=99)
    before = logits_of(model, batch)
    model.save_to(str(path))
    restored = MegatronNevaModel.restore_from(str(path))
    assert torch.equal(logits_of(restored, batch), before)
    return restored
