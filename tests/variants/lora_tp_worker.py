"""Worker for tests/variants/test_lora.py (run under torchrun): restore a PEFT .nemo at the requested TP/PP
layout (base from its base .nemo, resharded; adapters resharded), record logits, train a few optimizer
steps on deterministic batches, save the trained PEFT .nemo."""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main():

    from tests.model.helpers import restore_at_layout
    from tests.variants.lora_cases import lora_logits, lora_train

    ap = argparse.ArgumentParser()
    ap.add_argument("--nemo", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    model = restore_at_layout(args.nemo, args.tp, args.pp, args.sp)
    logits = lora_logits(model) if args.pp == 1 else None  # PP: logits live on the last stage only
    losses = lora_train(model, args.steps)
    model.save_to(os.path.join(args.out, "trained.nemo"))
    if dist.get_rank() == 0:
        if logits is not None:
            torch.save(logits, os.path.join(args.out, "logits.pt"))
        with open(os.path.join(args.out, "losses.json"), "w") as f:
            json.dump(losses, f)


if __name__ == "__main__":
    main()
