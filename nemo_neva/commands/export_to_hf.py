"""Export a NeVA .nemo (any TP/PP layout) as a Hugging Face LLaVA folder, the one serving engines load as it is.

    neva-export-hf --nemo-path IN.nemo --output-dir HF_DIR
    trtllm-serve HF_DIR  |  vllm serve HF_DIR  |  python -m sglang.launch_server --model-path HF_DIR

The folder (Hub layout of llava-hf checkpoints; the LM in its own family; chat template of the model's
conversation template; generation_config.json with its stop ids) also loads with
`LlavaForConditionalGeneration.from_pretrained` (a tiled model, model.mm_cfg.image_tiling:
`LlavaNextForConditionalGeneration`) and `AutoProcessor.from_pretrained`. HF_DIR must be new or empty; a refusal
writes nothing.
"""
from nemo_neva.cli import quiet_logs

quiet_logs()  # before NeMo / megatron-core are imported

import argparse
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nemo-path", required=True, help="the .nemo to export")
    ap.add_argument("--output-dir", required=True, help="folder for config.json, model.safetensors, "
                                                        "tokenizer and processor files")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="dtype of the written weights (default: that of the HF checkpoint the .nemo came from, "
                         "else float32)")
    ap.add_argument("--engine", choices=["vllm", "trtllm"], default=None,
                    help="also refuse what this engine's LLaVA cannot serve (trtllm: TensorRT-LLM's PyTorch backend, "
                         "LLaVA-NeXT with a Llama / Mistral LM only; vllm: no GPT-2 LM)")
    args = ap.parse_args(argv)

    from nemo_neva.export.hf import UnsupportedCheckpoint, export_nemo_to_hf

    try:
        out = export_nemo_to_hf(args.nemo_path, args.output_dir, args.dtype, args.engine)
    except (UnsupportedCheckpoint, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # the .nemo restore may start distributed helpers; keep the guard
    sys.exit(main())
