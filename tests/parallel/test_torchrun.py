"""ensure_distributed under a real torchrun launch (workers must join the agent's store via env://)."""
import os
import re
import subprocess
import sys

import pytest

from nemo_neva.parallel.init import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "torchrun_init.py")


@pytest.mark.parametrize("nproc, tp", [(1, 1), (2, 2)])
def test_torchrun_launch(nproc, tp):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
         SCRIPT, str(tp)],
        env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = sorted(re.findall(r"RESULT rank=\d+ world=\d+ backend=\w+ tp=\d+ dp=\d+ sum=\d+", out.stdout))
    assert results == [f"RESULT rank={r} world={nproc} backend=gloo tp={tp} dp={nproc // tp} sum={nproc}"
                       for r in range(nproc)]
