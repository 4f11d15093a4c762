"""Model FLOPs utilisation on CPU: achieved model FLOP/s of a training step / this CPU's measured matmul FLOP/s.

Model FLOPs per sample come from nemo_neva/perf/paper_model.py (`flops_per_sample`: 6 x params x tokens for the
learning LM GEMMs, attention QK^T/AV uncausal, frozen vision tower forward only). The reference peak is the
best fp32 `torch.mm` rate measured in the same run with the same thread count (square 1024-2048 matrices).
transformers' LlavaForConditionalGeneration on the same weights and batches is timed alongside (steps
alternate), so its MFU is printed too. Times are CPU seconds of the process (one torch thread), so other
load on a shared machine does not enter the ratio (see bench_train_common.paired_times). Batches: fixed length (one 64-token image + text), no padding.

    python bench/bench_mfu.py [--preset 100m] [--batch-size 2] [--seq 512] [--steps 3] [--threads 1]
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train_common as common  # noqa: E402


def matmul_flops(threads: int, sizes=(1024, 1536, 2048), reps: int = 5) -> float:
    """Best fp32 GEMM FLOP/s (per CPU-second, like the step times) over a few square sizes (2n^3 FLOPs)."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        for _ in range(reps):
            t = time.process_time()
            torch.mm(a, b)
            best = max(best, 2 * n ** 3 / max(time.process_time() - t, 1e-9))
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="100m", choices=sorted(common.PRESETS))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq", type=int, default=512, help="tokens per sample (64 image + the rest text)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)

    import torch

    from nemo_neva.perf.paper_model import Layout, flops_per_sample

    torch.set_num_threads(a.threads)
    peak_before = matmul_flops(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        info = common.prepare(a.preset, a.batch_size, tmp)
        text = a.seq - info["tokens_per_image"]
        batches = [common.make_batch(info, [text] * a.batch_size, 1, seed=i) for i in range(a.warmup + a.steps)]
        sides = {name: common.Side(name, info, a.threads) for name in ("ours", "hf")}
        run = common.paired_times(sides, batches, a.warmup)
    peak = max(peak_before, matmul_flops(a.threads))
    f = flops_per_sample(info["shape"], Layout(seq_length=a.seq, micro_batch_size=a.batch_size,
                                               global_batch_size=a.batch_size, precision="fp32",
                                               stage="finetune"))
    step_flops = f["total"] * a.batch_size
    print(f"machine: {common.machine()}; threads={a.threads}")
    print(f"preset {a.preset}: params {info['params']}; batch {a.batch_size} x {a.seq} tokens; "
          f"model FLOPs/step {step_flops / 1e9:.1f} G (LM GEMMs {f['lm_gemm'] * a.batch_size / 1e9:.1f} G)")
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    mfu = {}
    for s in ("ours", "hf"):
        t = common.median(run["times"][s])
        mfu[s] = step_flops / t / peak
        print(f"{s:5} median step {t:.2f} CPU-s ({common.median(run['wall'][s]):.2f} s wall)  {step_flops / t / 1e9:6.1f} GFLOP/s  MFU {100 * mfu[s]:.1f}%  "
              f"losses {[round(x, 4) for x in run['losses'][s]]}")
    print(f"ratio ours/hf MFU: {mfu['ours'] / mfu['hf']:.2f}x")


if __name__ == "__main__":
    main()
