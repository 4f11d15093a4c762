"""scripts/launch_neva.py: NeMo-Run runs the training example under torchrun (local, 2 CPU processes) and
writes the Slurm submission script (dry run) with the launch shape, the container and the overrides."""
import os
import subprocess
import sys

import pytest

from tests.model.helpers import ROOT
from tests.optional import require

require("nemo_run")

LAUNCHER = os.path.join(ROOT, "scripts", "launch_neva.py")


def _launch(args, cwd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NEMORUN_HOME": str(cwd / "nemo_run_home")}
    return subprocess.run([sys.executable, LAUNCHER, *args], cwd=str(cwd), capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_slurm_dryrun_writes_the_sbatch_script(tmp_path):
    proc = _launch(["--executor", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--container-image",
                    "nvcr.io/nvidia/nemo:24.07", "--account", "acct", "--partition", "batch", "--mounts",
                    "/lustre:/lustre", "/data:/data", "--repo-dir", "/opt/nemo-neva", "--job-dir", str(tmp_path / "jobs"),
                    "--script", "finetune", "--dryrun", "--", "trainer.max_steps=1000", "model.micro_batch_size=2"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --account=acct", "#SBATCH --partition=batch"):
        assert line in out, line
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert "--container-image nvcr.io/nvidia/nemo:24.07" in srun
    assert "/lustre:/lustre,/data:/data" in srun
    torchrun = srun[srun.index("torchrun "):].split()
    assert torchrun[torchrun.index("--nnodes") + 1] == "2" and torchrun[torchrun.index("--nproc-per-node") + 1] == "8"
    assert torchrun[torchrun.index("/opt/nemo-neva/examples/neva_finetune.py") + 1:] == [
        "trainer.devices=8", "trainer.num_nodes=2", "trainer.max_steps=1000", "model.micro_batch_size=2"]
    assert "export PYTHONPATH=/opt/nemo-neva" in out


def test_launch_mistakes_are_explained(tmp_path):
    proc = _launch(["--executor", "slurm", "--nodes", "2", "--dryrun"], tmp_path)
    assert proc.returncode == 2 and "--gpus-per-node" in proc.stderr and "--container-image" in proc.stderr
    proc = _launch(["--executor", "local", "--nproc-per-node", "2", "--", "trainer.devices=4"], tmp_path)
    assert proc.returncode == 2 and "contradicts the launch" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # ~1-2 min: NeMo-Run local executor + torchrun; 2-process training stays in test_torchrun_examples
def test_local_executor_runs_two_process_training_to_completion(tmp_path):
    exp = tmp_path / "exp"
    proc = _launch(["--executor", "local", "--nproc-per-node", "2", "--job-dir", str(tmp_path / "jobs"), "--",
                    "trainer.max_steps=2", f"exp_manager.exp_dir={exp}",
                    "exp_manager.checkpoint_callback_params.every_n_train_steps=1"], tmp_path)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "SUCCEEDED" in proc.stdout
    assert (exp / "neva_pretrain" / "neva_pretrain.nemo").is_file()
    # both ranks wrote their RNG state into the (distributed) training checkpoint
    ckpts = list((exp / "neva_pretrain" / "checkpoints").glob("*-last"))
    assert len(ckpts) == 1 and sorted(p.name for p in (ckpts[0] / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]
