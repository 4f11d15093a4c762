"""scripts/gpu_check.sh: the verdicts and the summary table on recorded numbers, the wheel folder against the
listing of the one scripts/gpu_wheels.sh made, and (slow) the whole check as a dry run on CPU."""
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_check_report as report  # noqa: E402

FALLING = [6.5, 6.3, 6.1, 5.8, 5.6, 5.1, 4.9, 4.6, 4.4, 4.2]


def _run(losses, tps=(), mfu=()):
    return report.Run("pretrain local bf16", list(losses), list(tps), list(mfu))


def test_training_row_passes_finite_falling_losses_and_reports_throughput():
    row = report.training_row(_run(FALLING, tps=[10.0, 900.0, 1000.0, 1100.0, 1000.0], mfu=[0.1, 0.3, 0.4, 0.4]),
                              steps=10)
    assert row.status == "PASS"
    # the median after 3 warm-up steps, not the first (slow) steps
    assert "1,050 tokens/s" in row.detail and "MFU 40.0 %" in row.detail and "6.500 -> 4.200" in row.detail


@pytest.mark.parametrize("losses, steps, why", [
    (FALLING[:5] + [math.nan] + FALLING[6:], 10, "not finite at step 5"),
    (list(reversed(FALLING)), 10, "not falling"),
    ([5.0] * 10, 10, "not falling"),
    (FALLING[:8], 10, "8 losses recorded for 10 steps"),
])
def test_training_row_fails(losses, steps, why):
    row = report.training_row(_run(losses), steps)
    assert row.status == "FAIL" and why in row.detail


def test_fp8_row_tolerance():
    bf16 = _run(FALLING)
    close = _run([v * 1.05 for v in FALLING])
    far = _run([v * 1.5 for v in FALLING])
    assert report.fp8_row("fp8 vs bf16", close, bf16).status == "PASS"
    row = report.fp8_row("fp8 vs bf16", far, bf16)
    assert row.status == "FAIL" and "50.00 %" in row.detail
    assert report.fp8_row("fp8 vs bf16", _run([math.nan] * 10), bf16).status == "FAIL"


def test_generation_row_names_the_first_answer_that_differs():
    assert report.generation_row("g", ["a", "b"], ["a", "b"], [10, 30]).status == "PASS"
    row = report.generation_row("g", ["a", "b x"], ["a", "b y"], [10, 30])
    assert row.status == "FAIL" and "#1" in row.detail and "'b x'" in row.detail
    assert report.generation_row("g", ["a", "b"], ["a", "b"], [10, 10]).status == "FAIL"  # padding not tested


def test_export_row_and_the_table():
    rows = [report.Row("environment", "INFO", "CPU"), report.export_row("hf export vs .nemo", 2e-5),
            report.export_row("hf export again", math.nan), report.Row("pretrain TE fp8", "SKIP", "no CUDA")]
    assert [r.status for r in rows[1:3]] == ["PASS", "FAIL"]
    text = report.table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["check", "status", "detail"] and len(lines) == 2 + len(rows)
    assert all(line.split("  ")[0].strip() in {r.check for r in rows} for line in lines[2:])
    assert report.failed(rows) and not report.failed(rows[:2] + rows[3:])


# ------------------------------------------------------------------------------------------- wheels
def _requirements():
    with open(os.path.join(ROOT, "scripts", "gpu_wheels.txt")) as f:
        return f.read().splitlines()


def test_recorded_wheel_folder_is_complete_small_and_installable_on_312():
    """scripts/gpu_wheels.listing is what scripts/gpu_wheels.sh downloaded (file names and bytes)."""
    listing = report.read_listing(os.path.join(ROOT, "scripts", "gpu_wheels.listing"))
    assert report.wheel_problems(listing) == []
    assert report.requirement_problems(listing, _requirements()) == []
    assert sum(size for _, size in listing) < 32 * 2**20  # measured 13.7 MiB; half the 64 MiB limit at most


@pytest.mark.parametrize("extra, problem", [
    (("torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl", 900 * 2**20), "torch must come from the host"),
    (("big-1.0-py3-none-any.whl", 60 * 2**20), "over the 64 MiB"),
    (("numpy-2.0.0-cp311-cp311-manylinux_2_28_x86_64.whl", 10), "not installable on CPython 3.12"),
    (("psutil-7.2.2-cp36-abi3-macosx_11_0_arm64.whl", 10), "not installable on CPython 3.12"),
])
def test_unfit_wheel_folders_are_named(extra, problem):
    listing = report.read_listing(os.path.join(ROOT, "scripts", "gpu_wheels.listing")) + [extra]
    assert any(problem in p for p in report.wheel_problems(listing))


def test_missing_wheels_are_named():
    listing = [(n, s) for n, s in report.read_listing(os.path.join(ROOT, "scripts", "gpu_wheels.listing"))
               if not n.startswith("megatron_core")]
    assert "no megatron_core wheel" in report.wheel_problems(listing)
    assert "no wheel for megatron-core==0.19.2" in report.requirement_problems(listing, _requirements())


# ------------------------------------------------------------------------------------------- the dry run
@pytest.mark.slow
def test_dry_run_passes_on_cpu(tmp_path):
    """The whole check on CPU with tiny sizes in this environment (6-8 min on 2 cores at a load of ~50; not yet
    timed on an idle machine)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["check"]: r for r in __import__("json").load(open(tmp_path / "summary.json"))}
    for check in ("pretrain local bf16", "finetune local bf16", "generate local bf16", "hf export vs .nemo"):
        assert rows[check]["status"] == "PASS", rows[check]
    assert rows["pretrain TE fp8"]["status"] == "SKIP"
    assert "check" in proc.stdout and "hf export vs .nemo" in proc.stdout
