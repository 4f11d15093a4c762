"""A .nemo restores through MegatronNevaModel.restore_from and through NeMo's generic ModelPT.restore_from."""
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from nemo_neva import MegatronNevaModel, build_model
from tests.model.helpers import ROOT, batch_for, llama_overrides, tiny_model_cfg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = build_model(tiny_model_cfg(**llama_overrides()))
    # perturb the projector so a restore that silently re-initialises would be caught
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = str(tmp_path_factory.mktemp("nemo") / "tiny.nemo")
    model.save_to(path)
    model.eval()
    batch = batch_for(model)
    logits = model(batch["tokens"], batch["position_ids"], images=batch["images"])
    return path, batch, logits


def test_nemo_contains_dist_checkpoint_and_hf_files(saved):
    path, _, _ = saved
    with tarfile.open(path) as tar:
        names = tar.getnames()
    for expected in ("model_config.yaml", "model_weights.ckpt", "model_weights/metadata.json",
                     "tokenizer/tokenizer.json", "image_processor/preprocessor_config.json",
                     "vision_config/config.json"):
        assert any(n.lstrip("./") == expected for n in names), (expected, names)


def test_restore_from_gives_identical_logits(saved):
    path, batch, logits = saved
    restored = MegatronNevaModel.restore_from(path)
    assert isinstance(restored, MegatronNevaModel)
    restored.eval()
    out = restored(batch["tokens"], batch["position_ids"], images=batch["images"])
    assert torch.equal(out, logits)


def test_the_connector_hands_the_config_it_restores_from_to_before_build(saved):
    """MegatronNevaModel.restore_from sets the parallel layout up through this hook, before NeMo builds the model:
    it gets the override when there is one, and is not called when only the config is read."""
    from omegaconf import OmegaConf

    from nemo_neva.checkpoint.nemo_connector import NevaSaveRestoreConnector

    path, _, _ = saved
    seen = []
    connector = NevaSaveRestoreConnector(before_build=lambda conf: seen.append(OmegaConf.to_container(conf)))
    cfg = MegatronNevaModel.restore_from(path, return_config=True, save_restore_connector=connector)
    assert seen == []
    cfg.seed = cfg.seed + 1
    model = MegatronNevaModel.restore_from(path, override_config_path=cfg, save_restore_connector=connector)
    assert [(c["seed"], c["target"]) for c in seen] == [(cfg.seed, model.cfg.target)]


GENERIC = r"""
import sys, torch
import nemo_neva  # registers the namespace with NeMo
from nemo.core import ModelPT
m = ModelPT.restore_from(sys.argv[1])
assert type(m).__name__ == "MegatronNevaModel", type(m)
m.eval()
b = torch.load(sys.argv[2])
torch.save(m(b["tokens"], b["position_ids"], images=b["images"]), sys.argv[3])
"""


def test_generic_modelpt_restore_in_fresh_process(saved, tmp_path):
    path, batch, logits = saved
    torch.save(batch, tmp_path / "batch.pt")
    proc = subprocess.run([sys.executable, "-c", GENERIC, path, str(tmp_path / "batch.pt"),
                           str(tmp_path / "out.pt")], cwd=str(tmp_path), capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), logits)


UNREGISTERED = r"""
import sys
from nemo.core import ModelPT
from nemo.core.classes.common import UnsafeTargetError
try:
    ModelPT.restore_from(sys.argv[1])
except UnsafeTargetError:
    print("REFUSED")
"""


def test_without_import_nemo_refuses_the_target(saved, tmp_path):
    path, _, _ = saved
    proc = subprocess.run([sys.executable, "-c", UNREGISTERED, path], cwd=str(tmp_path), capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert "REFUSED" in proc.stdout, proc.stderr[-3000:]


def test_a_restored_model_saves_a_restorable_nemo(saved, tmp_path):
    path, batch, logits = saved
    again = str(tmp_path / "again.nemo")
    MegatronNevaModel.restore_from(path).save_to(again)
    restored = MegatronNevaModel.restore_from(again)
    restored.eval()
    assert torch.equal(restored(batch["tokens"], batch["position_ids"], images=batch["images"]), logits)


def test_a_failed_restore_does_not_poison_later_models(saved, tmp_path):
    """NeMo's 'being restored' flag is process-global; a failed restore must not leave it set."""
    path, _, _ = saved
    broken = tmp_path / "broken.nemo"
    with tarfile.open(path) as src, tarfile.open(broken, "w") as dst:
        for member in src.getmembers():  # drop the weights folder: restore must fail
            if "model_weights/" not in member.name:
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    with pytest.raises(Exception, match="model_weights"):
        MegatronNevaModel.restore_from(str(broken))
    fresh = build_model(tiny_model_cfg())
    assert not fresh._weights_restored
