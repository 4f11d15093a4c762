"""Generation speed: ours (megatron-core KV cache) vs Hugging Face `LlavaForConditionalGeneration.generate`.

    python bench/bench_generate.py                       # defaults: see --help
    python bench/bench_generate.py --hidden 1024 --layers 8 --new-tokens 64 --batch 4

One process builds a random LLaMA-style NeVA model (RoPE, RMSNorm, SwiGLU, GQA, CLIP tower), exports it
with `nemo_neva.export.hf` and loads the export in transformers, so both sides run the same weights on the
same prompts (left-padded batch, greedy, no stop token). Per side, per batch size:
  time to first token (TTFT) = wall time of a 1-token generate (prefill incl. the vision tower);
  decode tokens/s = batch * (N - 1) / (time of an N-token generate - TTFT).
Also ours without the cache (full recompute per token). Medians over --repeats after a warm-up; the sides
alternate within each repeat (the CPU may be shared).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--groups", type=int, default=2, help="query groups (GQA); = heads for MHA")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--patch", type=int, default=14, help="image tokens = (image-size / patch) ** 2")
    ap.add_argument("--prompt-words", type=int, default=40, help="question length (text tokens besides the image)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-recompute", action="store_true", help="skip ours-without-cache (slow for long runs)")
    ap.add_argument("--compile", action="store_true",
                    help="add ours with the decode step under torch.compile (inference.compile); its compile "
                         "time is the warm-up call's, reported apart")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time instead of wall time -- the work done, which stays "
                         "comparable on a machine shared with other jobs (use with 1 thread)")
    return ap.parse_args(argv)


def _model(a):
    from omegaconf import open_dict

    from nemo_neva.cli import shipped_config

    from nemo_neva import build_model

    cfg = shipped_config("neva_pretrain").model
    image_tokens = (a.image_size // a.patch) ** 2
    with open_dict(cfg):
        cfg.tokenizer.path = os.path.join(ROOT, "data", "tokenizer")
        cfg.data.data_path = None
        cfg.encoder_seq_length = image_tokens + 4 * a.prompt_words + a.new_tokens + 64
        cfg.update(num_layers=a.layers, hidden_size=a.hidden, ffn_hidden_size=int(a.hidden * 8 / 3) // 64 * 64,
                   num_attention_heads=a.heads, num_query_groups=a.groups, position_embedding_type="rope",
                   normalization="RMSNorm", activation="swiglu", bias=False)
        cfg.mm_cfg.vision_encoder.config.update(image_size=a.image_size, patch_size=a.patch)
    return build_model(cfg)


def _prompts(batch: int, words: int) -> list[str]:
    vocab = "red green blue square circle triangle left right top bottom small large shape colour".split()
    # Different lengths per row, so the batch is really padded.
    return ["<image>\n" + " ".join(vocab[(i + j) % len(vocab)] for j in range(words + 3 * i)) + "?"
            for i in range(batch)]


def _timed(fn, clock):
    t = clock()
    out = fn()
    return clock() - t, out


def _measure(sides, new_tokens: int, repeats: int, clock) -> dict:
    """name -> (median TTFT s, median total s, tokens). Sides alternate within every repeat, so a change in
    machine load (shared CPU) hits all of them alike."""
    for name, fn in sides:
        seconds, _ = _timed(lambda: fn(2), clock)  # warm-up (and torch.compile's compile for that side)
        print(f"  warm-up (2 tokens) {name}: {seconds:.1f} s ({clock.__name__})", flush=True)
    ttft = {name: [] for name, _ in sides}
    total = {name: [] for name, _ in sides}
    tokens = {}
    for _ in range(repeats):
        for name, fn in sides:
            ttft[name].append(_timed(lambda: fn(1), clock)[0])
            seconds, tokens[name] = _timed(lambda: fn(new_tokens), clock)
            total[name].append(seconds)
    return {name: (statistics.median(ttft[name]), statistics.median(total[name]), tokens[name]) for name, _ in sides}


def main(argv=None):
    a = _args(argv)
    import torch
    from transformers import LlavaForConditionalGeneration

    from nemo_neva.export.hf import export_neva_to_hf
    from nemo_neva.inference.batching import left_pad
    from nemo_neva.inference.generate import encode_prompt, generate_tokens

    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    model = _model(a)
    model.eval()
    with tempfile.TemporaryDirectory() as hf_dir:
        export_neva_to_hf(model, hf_dir)
        hf = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    print(f"model: hidden {a.hidden}, {a.layers} layers, {a.heads} heads / {a.groups} groups, "
          f"{model.tokens_per_image} image tokens, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params; "
          f"torch threads {torch.get_num_threads()}; {a.new_tokens} new tokens; median of {a.repeats}; {a.clock} clock")
    rows = []
    for batch in a.batch:
        prompts = _prompts(batch, a.prompt_words)
        images = [torch.rand(3, a.image_size, a.image_size, generator=torch.Generator().manual_seed(i))
                  for i in range(batch)]
        ids, valid = left_pad([encode_prompt(model, p, True) for p in prompts])
        pixels = torch.stack(images)

        def ours(n, use_cache=True, compile_decode=False):
            return generate_tokens(model, images, prompts, max_new_tokens=n, stop_token_ids=[], use_cache=use_cache,
                                   compile_decode=compile_decode)

        def theirs(n):
            with torch.no_grad():
                out = hf.generate(input_ids=ids, attention_mask=valid.long(), pixel_values=pixels, max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
            return out[:, ids.shape[1]:].tolist()

        sides = [("ours (KV cache)", ours), ("HF generate", theirs)]
        if a.compile:
            sides.append(("ours (KV cache, compiled)", lambda n: ours(n, compile_decode=True)))
        if not a.no_recompute:
            sides.append(("ours (no cache)", lambda n: ours(n, use_cache=False)))
        result = {name: (ttft, batch * (a.new_tokens - 1) / (total - ttft), tokens)
                  for name, (ttft, total, tokens) in _measure(sides, a.new_tokens, a.repeats, clock).items()}
        same = result["ours (KV cache)"][2] == result["HF generate"][2]
        for name, (ttft, tps, _) in result.items():
            rows.append((batch, ids.shape[1], name, ttft, tps))
        lengths = f"{int(valid.sum(1).min())}-{ids.shape[1]}"
        print(f"batch {batch} (prompt {lengths} tokens): greedy tokens ours == HF: {same}")
        hf_ttft, hf_tps = result["HF generate"][:2]
        ours_ttft, ours_tps = result["ours (KV cache)"][:2]
        print(f"  decode throughput ours/HF: {ours_tps / hf_tps:.2f}x   TTFT ours/HF: {ours_ttft / hf_ttft:.2f}x")
        if "ours (KV cache, compiled)" in result:
            c_ttft, c_tps, c_tokens = result["ours (KV cache, compiled)"]
            print(f"  compiled: decode throughput ours/HF {c_tps / hf_tps:.2f}x, greedy tokens == HF: "
                  f"{c_tokens == result['HF generate'][2]}")
        if "ours (no cache)" in result:
            print(f"  decode throughput ours cache/no cache: {ours_tps / result['ours (no cache)'][1]:.2f}x")
    print("\n| batch | prompt tokens (max) | side | TTFT (ms) | decode tokens/s |\n| --- | --- | --- | --- | --- |")
    for batch, length, name, ttft, tps in rows:
        print(f"| {batch} | {length} | {name} | {ttft * 1e3:.0f} | {tps:.1f} |")


if __name__ == "__main__":
    main()
