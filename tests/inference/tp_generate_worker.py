"""Worker for test_tp_generation.py (run under torchrun): restore a .nemo at TP=N and generate.

Every rank writes its own answers, so the test can check both TP=N == TP=1 and that the ranks agree.
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

    from nemo_neva.inference.generate import generate_tokens
    from tests.model.helpers import restore_at_layout

    ap = argparse.ArgumentParser()
    ap.add_argument("--nemo", required=True)
    ap.add_argument("--requests", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--sp", action="store_true")
    args = ap.parse_args()

    model = restore_at_layout(args.nemo, tp=args.tp, sp=args.sp)
    req = torch.load(args.requests)
    greedy = generate_tokens(model, req["images"], req["prompts"], max_new_tokens=req["max_new_tokens"],
                             stop_token_ids=[])
    sampled = generate_tokens(model, req["images"], req["prompts"], max_new_tokens=req["max_new_tokens"],
                              stop_token_ids=[], temperature=1.0)  # unseeded: ranks must still agree
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"greedy": greedy, "sampled": sampled, "sp_after": model.model.config.sequence_parallel}, f)


if __name__ == "__main__":
    main()
