"""The user-facing multi-process form: torchrun + examples/neva_pretrain.py on CPU (gloo), then restore the
.nemo on one process."""
import os
import subprocess
import sys

import pytest
import torch

from nemo_neva import MegatronNevaModel
from nemo_neva.parallel.init import free_port
from tests.model.helpers import ROOT, batch_for


# tp2 is slow-only (~1 min): PP=2 through the example script is the harder launch; TP=2 training and restore
# are covered in the default suite by tests/model/test_model_parallel.py and tests/parallel/.
@pytest.mark.parametrize("layout", [pytest.param("model.tensor_model_parallel_size=2", marks=pytest.mark.slow),
                                    "model.pipeline_model_parallel_size=2"], ids=["tp2", "pp2"])
def test_torchrun_pretrain_writes_a_nemo_that_restores_on_one_process(tmp_path, layout):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", os.path.join(ROOT, "examples", "neva_pretrain.py"), "trainer.devices=2",
           layout, "trainer.max_steps=2", f"exp_manager.exp_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    model = MegatronNevaModel.restore_from(str(tmp_path / "neva_pretrain" / "neva_pretrain.nemo"))
    assert model.cfg.tensor_model_parallel_size == 1 and model.cfg.pipeline_model_parallel_size == 1
    model.eval()
    batch = batch_for(model, n=1)
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], images=batch["images"])
    assert torch.isfinite(logits).all()


def test_launch_with_wrong_device_count_is_explained(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "neva_pretrain.py"), "trainer.devices=2",
                           f"exp_manager.exp_dir={tmp_path}"], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "torchrun --nproc_per_node=2" in proc.stderr
    assert "Traceback" not in proc.stderr
