"""Import of a pretrained LM: wall time and peak host memory of building NeVA with `llm.from_pretrained` on a
~1B-parameter random Llama written with `save_pretrained` in bf16, against transformers' `from_pretrained` of
the same folder. Each side runs in a fresh process (peak RSS = that process's ru_maxrss), both in fp32.

    python bench/bench_import.py [--workdir /tmp/neva_bench_import] [--layers 16]

Prints one line per side and the ratios; the folder is written once and reused.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_checkpoint(folder: str, layers: int) -> int:
    """A random Llama of ~1B parameters at the default 16 layers (hidden 2048, ffn 8192, GQA 32/8, vocab 32000)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    if not os.path.isfile(os.path.join(folder, "config.json")):
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
        from tests.pretrained.lm_helpers import metaspace_tokenizer

        metaspace_tokenizer().save_pretrained(folder)  # a small tokenizer: the LM's vocab stays 32000
    return n


def _load_ours(folder: str) -> None:
    from omegaconf import open_dict

    from nemo_neva.cli import shipped_config

    from nemo_neva import build_model
    from nemo_neva.pretrained.lm_config import drop_unset_lm_keys

    cfg = shipped_config("neva_pretrain").model
    with open_dict(cfg):
        cfg.mm_cfg.llm.from_pretrained = folder
        cfg.data.data_path = os.path.join(ROOT, "data", "shapes_demo", "stage1_captions.json")
        cfg.data.image_folder = os.path.join(ROOT, "data", "shapes_demo", "images")
    drop_unset_lm_keys(cfg, [])
    build_model(cfg)


def _load_theirs(folder: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _child(side: str, folder: str) -> None:
    import torch  # noqa: F401  (imports are not what is measured)
    import transformers  # noqa: F401

    import nemo_neva  # noqa: F401

    start = time.perf_counter()
    (_load_ours if side == "ours" else _load_theirs)(folder)
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(json.dumps({"side": side, "seconds": seconds, "peak_rss_gib": peak_gib}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/neva_bench_import")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--child", choices=["ours", "theirs"])
    a = ap.parse_args()
    folder = os.path.join(a.workdir, f"llama_{a.layers}l")
    if a.child:
        return _child(a.child, folder)
    sys.path.insert(0, ROOT)
    n = make_checkpoint(folder, a.layers)
    print(f"checkpoint: {n / 1e9:.2f}B parameters, bf16, {folder}")
    out = {}
    for side in ("theirs", "ours"):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--workdir", a.workdir, "--layers",
                               str(a.layers), "--child", side], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{side:6s}: {out[side]['seconds']:.1f} s, peak RSS {out[side]['peak_rss_gib']:.2f} GiB")
    fp32_gib = n * 4 / 2**30
    print(f"one fp32 copy of the LM: {fp32_gib:.2f} GiB; ours / transformers: time "
          f"{out['ours']['seconds'] / out['theirs']['seconds']:.2f}x, peak RSS "
          f"{out['ours']['peak_rss_gib'] / out['theirs']['peak_rss_gib']:.2f}x")


if __name__ == "__main__":
    main()
