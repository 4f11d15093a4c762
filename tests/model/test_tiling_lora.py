"""LoRA on an anyres-tiled model (one process): the learned image_newline belongs to the projector side, as in
LLaVA-NeXT, so `peft.train_projector` trains it with the projector and the PEFT .nemo stores it (a restore
would otherwise bring back the base's newline). Batches: rows with 1, 2 or 0 images of different token counts,
split into micro-batches."""
import tarfile

import pytest
import torch
from omegaconf import open_dict

from nemo_neva import MegatronNevaModel, build_model
from tests.model.helpers import TILED_SIZES, llama_overrides, tiled_batch_for, tiny_model_cfg
from tests.variants.lora_cases import peft_cfg


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model.model(batch["tokens"], batch["position_ids"], images=batch["images"],
                           image_sizes=batch["image_sizes"], num_images=batch["num_images"])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiled_lora")
    torch.manual_seed(0)
    cfg = tiny_model_cfg(**llama_overrides(), **{"mm_cfg.image_tiling.enabled": True, "encoder_seq_length": 256,
                                                  "global_batch_size": 4, "micro_batch_size": 2,
                                                  "optim.sched": None})
    path = str(root / "base.nemo")
    build_model(cfg).save_to(path)
    return root, path


def _peft_model(path, train_projector=True):
    cfg = peft_cfg(path)
    with open_dict(cfg):
        cfg.peft.train_projector = train_projector
    return MegatronNevaModel.restore_from(path, override_config_path=cfg)


def test_lora_trains_adapters_projector_and_newline_and_the_peft_nemo_keeps_them(base):
    from megatron.core.dist_checkpointing import load_tensors_metadata

    root, path = base
    model = _peft_model(path)
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.model.named_parameters()
                if n.endswith((".lora_a", ".lora_b")) or n.startswith("projector.")} | {"image_newline"}
    assert trainable == expected
    before = _state(model.model)
    batch = tiled_batch_for(model, TILED_SIZES, 160, seed=1)  # the same batch each step: its loss must fall
    model.train()
    opt = model.configure_optimizers()
    losses = [float(model.train_on_batch(batch, opt)) for _ in range(4)]
    # Adam at lr 2e-3 on one repeated batch: a clear monotone fall, far above fp32 noise
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.01, losses
    after = _state(model.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "image_newline" in changed and any(k.startswith("projector.") for k in changed)
    assert any(k.endswith(".lora_b") for k in changed)
    assert changed <= expected, changed - expected  # base LM weights and the tower stay as they were

    model.save_to(str(root / "peft.nemo"))
    with tarfile.open(root / "peft.nemo") as tar:
        tar.extractall(root / "peft_files", filter="data")
    keys = set(load_tensors_metadata(str(root / "peft_files" / "model_weights")))
    assert "model.image_newline" in keys
    assert all(k.endswith((".lora_a", ".lora_b")) or k.startswith("model.projector.") or k == "model.image_newline"
               for k in keys), keys
    restored = MegatronNevaModel.restore_from(str(root / "peft.nemo"))  # base weights first, then the PEFT ones
    assert torch.equal(restored.model.image_newline, model.model.image_newline)
    assert not torch.equal(restored.model.image_newline, before["image_newline"])
    assert torch.equal(_logits(restored, batch), _logits(model, batch))


def test_frozen_projector_freezes_the_newline_too(base):
    model = _peft_model(base[1], train_projector=False)
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable), trainable
