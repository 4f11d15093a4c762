"""Worker for test_sp_odd_lengths.py (run under torchrun): restore a .nemo at TP=2 with sequence parallelism and
train on the saved odd-length batches; rank 0 writes the per-step losses."""
import json
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)


def main(nemo, batches_path, out):
    from tests.model.helpers import restore_at_layout

    model = restore_at_layout(nemo, tp=2, sp=True, global_batch_size=4, micro_batch_size=2)
    optimizer = model.configure_optimizers()
    batches = torch.load(batches_path)
    sums = [model._run_batch(b, forward_only=True).tolist() for b in batches[:3]]  # [loss sum, loss tokens]
    losses = [float(model.train_on_batch(batch, optimizer)) for batch in batches]
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "sums": sums}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
