"""Decode-step A/B of the layer classes, in one process on one model (what bench_generate cannot isolate).

    python bench/bench_decode_layers.py --rounds 5 --steps 32

Builds bench_generate's model, then alternates, per round, between megatron-core's `SelfAttention` and
`RowParallelLinear` and ours (`RotatedKVCacheSelfAttention`, `RowParallelLinearOwnGroup`), swapping the
classes of the same layer objects (same weights). Reports the median CPU ms per cached decode step (the
step plus an argmax) and whether all variants produced the same greedy tokens.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    a = ap.parse_args(argv)
    import bench_generate as bg
    import torch
    from megatron.core.tensor_parallel.layers import RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention

    from nemo_neva.inference.batching import left_pad
    from nemo_neva.inference.generate import encode_prompt
    from nemo_neva.inference.kv_cache import CachedDecoder
    from nemo_neva.modules.rotated_kv_attention import RotatedKVCacheSelfAttention
    from nemo_neva.modules.row_linear import RowParallelLinearOwnGroup

    torch.manual_seed(0)
    model = bg._model(bg._args(["--new-tokens", str(a.steps)]))
    model.eval()
    lm = model.model.language_model
    attention = [m for m in lm.modules() if isinstance(m, SelfAttention)]
    rows = [m for m in lm.modules() if isinstance(m, RowParallelLinear)]
    variants = {"megatron-core": (SelfAttention, RowParallelLinear),
                "rotated-key cache": (RotatedKVCacheSelfAttention, RowParallelLinear),
                "rotated-key cache + row group": (RotatedKVCacheSelfAttention, RowParallelLinearOwnGroup)}

    def run(batch, steps):
        ids, valid = left_pad([encode_prompt(model, p, True) for p in bg._prompts(batch, 40)])
        pixels = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        decoder = CachedDecoder(model.model, pixels, list(range(batch)), ids.shape[1] + steps + 1)
        tokens = []
        with torch.no_grad():
            logits = decoder.prefill(ids, valid)
            start = time.process_time()
            for _ in range(steps):
                chosen = logits.argmax(-1)
                tokens.append(chosen.tolist())
                logits = decoder.step(chosen)
            return (time.process_time() - start) / steps, tokens

    for batch in a.batch:
        times, tokens = {k: [] for k in variants}, {}
        for rnd in range(a.rounds + 1):  # round 0 warms up
            for name, (att_cls, row_cls) in variants.items():
                for m in attention:
                    m.__class__ = att_cls
                for m in rows:
                    m.__class__ = row_cls
                seconds, tokens[name] = run(batch, a.steps)
                if rnd:
                    times[name].append(seconds)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        base = ms["megatron-core"]
        print(f"batch {batch}: " + "; ".join(f"{k} {v:.2f} ms ({base / v:.2f}x)" for k, v in ms.items())
              + f" | same greedy tokens: {len({str(t) for t in tokens.values()}) == 1}", flush=True)


if __name__ == "__main__":
    main()
