"""How the training step time grows with sequence length and with images per sample, ours vs transformers.

Same weights and batches on both sides (see bench_train_common; steps alternate between the two models).
Sequence sweep: one 64-token image + text, total length L. Image sweep: k images per sample (64 tokens each,
spliced in order) + 128 text tokens, so the length is 64k + 128. Median CPU seconds of the timed steps per point (one torch thread; see bench_train_common.paired_times).

    python bench/bench_scaling.py [--preset small] [--batch-size 2] [--steps 3] [--threads 1]
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train_common as common  # noqa: E402


def point(sides, info, a, text: int, images: int) -> dict:
    batches = [common.make_batch(info, [text] * a.batch_size, images, seed=i) for i in range(a.warmup + a.steps)]
    run = common.paired_times(sides, batches, a.warmup)
    return {s: common.median(run["times"][s]) for s in sides}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=sorted(common.PRESETS))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lengths", default="128,256,512,1024")
    p.add_argument("--images", default="0,1,2,4")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        info = common.prepare(a.preset, a.batch_size, tmp)
        sides = {name: common.Side(name, info, a.threads) for name in ("ours", "hf")}
        P = info["tokens_per_image"]
        print(f"machine: {common.machine()}; threads={a.threads}; preset {a.preset}, batch {a.batch_size}")
        print(f"{'sweep':8} {'point':>14} {'ours CPU-s':>11} {'hf CPU-s':>9} {'hf/ours':>8}")
        for L in (int(x) for x in a.lengths.split(",")):
            t = point(sides, info, a, L - P, 1)
            print(f"{'seq':8} {f'L={L}':>14} {t['ours']:11.3f} {t['hf']:9.3f} {t['hf'] / t['ours']:8.2f}")
        for k in (int(x) for x in a.images.split(",")):
            t = point(sides, info, a, 128, k)
            label = f"{k} img, L={k * P + 128}"
            print(f"{'images':8} {label:>14} {t['ours']:11.3f} {t['hf']:9.3f} {t['hf'] / t['ours']:8.2f}")


if __name__ == "__main__":
    main()
