#!/usr/bin/env python
"""Paper model: per-GPU memory and expected tokens/s of NeVA training for a parallel layout.

    neva-memory-model                                  # the recommended layouts table
    neva-memory-model --models 22B --tp 8 --pp 1 --dp 4 --seq-length 4096 --recompute selective
    neva-memory-model --models 43B --tp 8 --pp 2 --dp 2 --precision fp8 --mfu 0.35

Formulas: nemo_neva/perf/paper_model.py, explained in docs/PARALLELISM.md. Estimates, not measurements.
"""
import argparse

from nemo_neva.perf import paper_model as pm  # pure arithmetic: importing it loads no torch / NeMo

# (model, layout) pairs of docs/PARALLELISM.md: 80 GiB H100, global batch 128, stage 2 (LM learns)
RECOMMENDED = [
    ("8B", pm.Layout(tp=2, pp=1, dp=4, sequence_parallel=True)),
    ("8B", pm.Layout(tp=2, pp=1, dp=4, sequence_parallel=True, precision="fp8")),
    ("22B", pm.Layout(tp=4, pp=1, dp=4, sequence_parallel=True)),
    ("22B", pm.Layout(tp=8, pp=1, dp=2, sequence_parallel=True, precision="fp8")),
    ("43B", pm.Layout(tp=8, pp=1, dp=4, sequence_parallel=True)),
    ("43B", pm.Layout(tp=8, pp=2, dp=2, sequence_parallel=True, precision="fp8")),
    ("8B", pm.Layout(tp=1, pp=1, dp=8, recompute="full")),
    ("43B", pm.Layout(tp=8, pp=2, dp=2, sequence_parallel=True, seq_length=32768, recompute="full")),
]


def _describe(lay: pm.Layout) -> str:
    rc = lay.recompute or "none"
    if lay.recompute == "full":
        rc += f"/{lay.recompute_method}{lay.recompute_num_layers}"
    return (f"TP{lay.tp} PP{lay.pp} DP{lay.dp}{' SP' if lay.sequence_parallel else ''} mbs{lay.micro_batch_size} "
            f"s{lay.seq_length} rc={rc} {lay.precision}{' distopt' if lay.distributed_optimizer else ''}")


def table(rows, mfu: float) -> str:
    head = (f"{'model':<5} {'params':>7} {'layout':<58} {'weights':>8} {'grads':>7} {'optim':>7} {'fp8w':>6} "
            f"{'activ':>7} {'total GiB':>9} {'tokens/s':>10} {'/GPU':>7}")
    lines = [head, "-" * len(head)]
    for name, lay in rows:
        m = pm.ngc_model(name)
        mem = pm.memory_per_gpu(m, lay)
        tput = pm.tokens_per_second(m, lay, mfu=mfu)
        lines.append(
            f"{name:<5} {pm.neva_params(m)['total'] / 1e9:6.1f}B {_describe(lay):<58} {mem['weights']:8.1f} "
            f"{mem['grads']:7.1f} {mem['optimizer']:7.1f} {mem['fp8_weight_cache']:6.1f} {mem['activations']:7.1f} "
            f"{mem['total']:9.1f} {tput['tokens_per_s']:10.0f} {tput['tokens_per_s_per_gpu']:7.0f}"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=sorted(pm.NGC_LMS), help="default: the recommended table")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--sequence-parallel", action="store_true")
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--global-batch-size", type=int, default=128)
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    ap.add_argument("--recompute-method", choices=["uniform", "block"], default="uniform")
    ap.add_argument("--recompute-num-layers", type=int, default=1)
    ap.add_argument("--no-distributed-optimizer", action="store_true")
    ap.add_argument("--precision", choices=["bf16", "fp8", "fp32"], default="bf16")
    ap.add_argument("--stage", choices=["pretrain", "finetune"], default="finetune",
                    help="pretrain: only the projector learns; finetune: LM + projector")
    ap.add_argument("--no-flash-attention", action="store_true")
    ap.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation assumed for tokens/s")
    args = ap.parse_args(argv)

    print(f"H100 SXM peaks: bf16 {pm.H100_PEAK_TFLOPS['bf16']:.0f} TFLOP/s, fp8 {pm.H100_PEAK_TFLOPS['fp8']:.0f}; "
          f"MFU {args.mfu:.2f}; tower CLIP ViT-L/14-336 ({pm.vision_params(pm.CLIP_VIT_L_14_336) / 1e6:.0f}M, "
          f"frozen), projector mlp2x_gelu. Memory in GiB per GPU (worst pipeline stage).")
    if not args.models:
        print("Recommended layouts (global batch 128, stage 2 fine-tuning, flash attention, distributed optimizer):")
        print(table(RECOMMENDED, args.mfu))
        return
    lay = pm.Layout(
        tp=args.tp, pp=args.pp, dp=args.dp, sequence_parallel=args.sequence_parallel,
        micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
        global_batch_size=args.global_batch_size,
        recompute=None if args.recompute == "none" else args.recompute, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers, distributed_optimizer=not args.no_distributed_optimizer,
        precision=args.precision, stage=args.stage, flash_attention=not args.no_flash_attention,
    )
    print(table([(name, lay) for name in args.models], args.mfu))


if __name__ == "__main__":
    main()
