"""Worker for the multi-process model tests (run under torchrun; see test_model_parallel.py).

Restores a .nemo at the requested TP/PP layout (megatron-core resharding), records logits, trains a few
optimizer steps through megatron-core's DDP/optimizer/schedules on deterministic batches (each
data-parallel rank takes its slice of the global batch), and saves the result as a .nemo.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main():
    from megatron.core import parallel_state as ps

    from nemo_neva.training.megatron_step import MegatronOptimizerAdapter  # noqa: F401  (import check)
    from nemo_neva.training.megatron_step import PER_IMAGE, split_microbatches
    from tests.model.helpers import TILED_SIZES, batch_for, restore_at_layout, tiled_batch_for

    ap = argparse.ArgumentParser()
    ap.add_argument("--nemo", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--optim", default="adam")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--images-per-row", default=None,
                    help="comma list cycled over a batch's rows (e.g. 2,0,1,2): training batches mix image counts")
    args = ap.parse_args()
    per_row = [int(x) for x in args.images_per_row.split(",")] if args.images_per_row else None

    # constant LR (no schedule) keeps the comparison simple
    model = restore_at_layout(args.nemo, args.tp, args.pp, args.sp,
                              **{"optim.name": args.optim, "optim.sched": None})
    model.eval()
    if model.tiling is not None:  # anyres: rows with images of different sizes (different placeholder counts)
        def batch_for(model, n, seed, **_):  # noqa: F811
            return tiled_batch_for(model, [TILED_SIZES[(seed + i) % len(TILED_SIZES)] for i in range(n)], 160, seed)
    probe = batch_for(model, n=2, seed=100)
    with torch.no_grad():
        logits = model.model(probe["tokens"], probe["position_ids"], images=probe["images"],
                             image_sizes=probe.get("image_sizes"), num_images=probe["num_images"],
                             runtime_gather_output=True) if ps.is_pipeline_last_stage() and args.pp == 1 else None
    model.train()
    opt = model.configure_optimizers()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    losses = []
    for step in range(args.steps):
        full = batch_for(model, n=model.cfg.global_batch_size, seq=48 if per_row else 40, seed=step,
                         images_per_row=per_row)
        per_rank = model.cfg.global_batch_size // dp
        batch = split_microbatches(full, per_rank)[dp_rank]  # images (and tiled sizes) follow their rows
        if not ps.is_pipeline_first_stage():  # only the first stage encodes images: later ones must not need them
            batch = {k: v for k, v in batch.items() if k not in PER_IMAGE}
        losses.append(float(model.train_on_batch(batch, opt)))
    model.save_to(os.path.join(args.out, "trained.nemo"))
    if dist.get_rank() == 0:
        if logits is not None:
            torch.save(logits, os.path.join(args.out, "logits.pt"))
        with open(os.path.join(args.out, "losses.json"), "w") as f:
            json.dump(losses, f)


if __name__ == "__main__":
    main()
