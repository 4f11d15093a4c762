"""Convert a local Hugging Face LLaVA checkpoint (LlavaForConditionalGeneration, or LlavaNextForConditionalGeneration:
model_type llava_next -> model.mm_cfg.image_tiling with its image_grid_pinpoints and image_newline) into a NeVA .nemo.

    neva-convert-hf --input-dir HF_DIR --output-path OUT.nemo [--trust-pickle]
"""
from nemo_neva.cli import quiet_logs

quiet_logs()  # before NeMo / megatron-core are imported

import argparse
import os
import sys



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-dir", required=True, help="local HF LLaVA folder (config.json, *.safetensors, "
                                                       "tokenizer, preprocessor_config.json)")
    ap.add_argument("--output-path", required=True, help="the .nemo file to write")
    ap.add_argument("--trust-pickle", action="store_true",
                    help="allow reading pickle *.bin weights when the folder has no safetensors")
    ap.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    args = ap.parse_args(argv)

    from nemo_neva.export.hf import UnsupportedCheckpoint, convert_hf_to_nemo

    try:
        path = convert_hf_to_nemo(args.input_dir, args.output_path, trust_pickle=args.trust_pickle,
                                  make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    except (UnsupportedCheckpoint, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # required: the dist-checkpoint writer starts spawn-context processes
    sys.exit(main())
