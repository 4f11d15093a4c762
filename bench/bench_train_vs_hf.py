"""Training throughput and per-step peak memory: our NeVA vs transformers' LlavaForConditionalGeneration.

Same weights (ours exported with nemo_neva/export/hf.py; vocabulary 576 with no padded rows, so the losses
agree), same batches (a realistic length mix: one image of 64 tokens + log-uniform 32..448 text tokens per
sample, right-padded), one AdamW step with grad clipping each, fp32 on CPU, vision tower frozen in both.
tokens/s counts real (unpadded) tokens per CPU-second of the step (one torch thread; see
bench_train_common.paired_times). Time: both models in one process taking turns on each batch;
memory: each side alone in a child process (see bench_train_common).

    python bench/bench_train_vs_hf.py [--preset small] [--batch-size 4] [--steps 8] [--warmup 2] [--threads 1]
                                      [--packed [--pack-length N]]

--packed adds a third side, "ours-packed": our model (its own copy of the same weights) trained on the same
samples of each batch packed into fewer rows of at most --pack-length tokens (default: the padded batch's
length, so no row is longer than in the padded batch; bench_train_common.pack_ours): fewer padded tokens.
tokens/s still counts real tokens only, so its ratio to HF (padded) is the gain packing buys. The model
trains packed rows in megatron-core's THD layout (PackedSeqParams, attention per sample); on one pipeline
stage it also leaves the rows' padding out, so it computes the real tokens only, whatever --pack-length.
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train_common as common  # noqa: E402


def batches_for(info, a, n):
    batches = [common.make_batch(info, common.length_mix(a.batch_size, seed=i), 1, seed=i) for i in range(n)]
    if a.packed:
        for b in batches:
            b["ours-packed"] = common.pack_ours(b, info, 1, a.pack_length or b["ours"]["tokens"].shape[1])
    return batches


def child(a) -> None:
    """Memory only: this side alone, warm-up step (optimizer state appears) + 2 steps."""
    info = json.load(open(a.info))
    side = common.Side(a.side, info, a.threads)
    print(json.dumps(common.measure(side, batches_for(info, a, 3), warmup=1)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=sorted(common.PRESETS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--packed", action="store_true", help="also time ours on the same samples, packed")
    p.add_argument("--pack-length", type=int, default=0,
                   help="packed row capacity in tokens (default: the batch's padded length)")
    p.add_argument("--side", choices=["ours", "hf", "ours-packed"], help=argparse.SUPPRESS)
    p.add_argument("--info", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.side:
        return child(a)

    import torch

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        info = common.prepare(a.preset, a.batch_size, tmp)
        print(f"machine: {common.machine()}; threads={a.threads}")
        print(f"preset {a.preset}: params {info['params']}; batch {a.batch_size}, {a.steps} timed steps "
              f"after {a.warmup} warm-up")
        info_path = os.path.join(tmp, "info.json")
        json.dump({k: v for k, v in info.items() if k not in ("shape", "params")}, open(info_path, "w"))
        args = ["--preset", a.preset, "--batch-size", str(a.batch_size), "--threads", str(a.threads),
                "--info", info_path] + (["--packed", "--pack-length", str(a.pack_length)] if a.packed else [])
        names = ["ours", "hf"] + (["ours-packed"] if a.packed else [])
        mem = {side: common.run_child(__file__, args + ["--side", side]) for side in names}
        sides = {name: common.Side(name, info, a.threads) for name in names}
        batches = batches_for(info, a, a.warmup + a.steps)
        run = common.paired_times(sides, batches, a.warmup)
    print(f"first-step loss: ours {run['losses']['ours'][0]:.6f}  hf {run['losses']['hf'][0]:.6f} "
          f"(same weights and batch); last: ours {run['losses']['ours'][-1]:.6f}  hf {run['losses']['hf'][-1]:.6f}")
    tok = sum(run["tokens"])
    tps = {s: tok / sum(run["times"][s]) for s in sides}
    per_batch = [h / o for o, h in zip(run["times"]["ours"], run["times"]["hf"])]
    print(f"{'':11} {'tokens/CPU-s':>12} {'median CPU-s':>13} {'median wall s':>14} {'peak MiB/step':>14} "
          f"{'first step MiB':>15}")
    for s in names:
        print(f"{s:11} {tps[s]:12.1f} {common.median(run['times'][s]):13.3f} {common.median(run['wall'][s]):14.3f} "
              f"{mem[s]['peak_step_mib']:14.1f} {mem[s]['peak_first_step_mib']:15.1f}")
    print(f"ratio ours/hf: tokens/s {tps['ours'] / tps['hf']:.2f}x (median of per-batch ratios "
          f"{common.median(per_batch):.2f}x, range {min(per_batch):.2f}-{max(per_batch):.2f}); peak memory per "
          f"step {mem['ours']['peak_step_mib'] / mem['hf']['peak_step_mib']:.2f}x (RSS high-water mark delta)")
    if a.packed:
        timed = batches[a.warmup:]
        padded = sum(b["padded_tokens"] for b in timed)
        # tokens the model computes: its THD layout leaves the rows' padding out on one pipeline stage
        layout = sides["ours-packed"].model._packed_layout
        packed = sum(layout(b["ours-packed"])["tokens"].numel() for b in timed)
        per_batch = [h / o for o, h in zip(run["times"]["ours-packed"], run["times"]["hf"])]
        print(f"packed: {packed} computed tokens vs {padded} padded ({tok} real); first-step loss ours-packed "
              f"{run['losses']['ours-packed'][0]:.6f}, last {run['losses']['ours-packed'][-1]:.6f}")
        print(f"ratio ours-packed/hf (padded): real tokens/s {tps['ours-packed'] / tps['hf']:.2f}x (median of "
              f"per-batch ratios {common.median(per_batch):.2f}x, range {min(per_batch):.2f}-{max(per_batch):.2f}); "
              f"peak memory per step {mem['ours-packed']['peak_step_mib'] / mem['hf']['peak_step_mib']:.2f}x")


if __name__ == "__main__":
    main()
