"""Export a NeVA .nemo (any TP/PP layout) as a Hugging Face LLaVA folder, the one serving engines load as it is.

    neva-export-hf --nemo-path IN.nemo --output-dir HF_DIR
    trtllm-serve HF_DIR  |  vllm serve HF_DIR  |  python -m sglang.launch_server --model-path HF_DIR

The folder (Hub layout of llava-hf checkpoints; the LM in its own family; chat template of the model's
conversation template; generation_config.json with its stop ids) also loads with
`LlavaForConditionalGeneration.from_pretrained` (a tiled model, model.mm_cfg.image_tiling:
`LlavaNextForConditionalGeneration`) and `AutoProcessor.from_pretrained`. HF_DIR must be new or empty; a refusal
writes nothing.

    neva-export-hf --nemo-path IN.nemo --output-dir HF_DIR --fp8 --calib-data train.json --calib-images IMAGES

writes the LM's linears in FP8 (per-tensor scales, activation scales calibrated on your samples) in NVIDIA
ModelOpt's format (hf_quant_config.json), which TensorRT-LLM's PyTorch backend and vLLM load on FP8 GPUs
(Ada / Hopper and newer); vision tower, projector and lm_head stay in --dtype (default bfloat16 with --fp8).
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
    ap.add_argument("--fp8", action="store_true",
                    help="FP8 (E4M3) LM linears in ModelOpt's format; needs --calib-data")
    ap.add_argument("--calib-data", default=None, help="LLaVA-format JSON whose samples calibrate the FP8 "
                                                       "activation scales (your training / eval data)")
    ap.add_argument("--calib-images", default=None, help="image folder of --calib-data")
    ap.add_argument("--calib-samples", type=int, default=16, help="calibration samples (default 16)")
    args = ap.parse_args(argv)
    if args.fp8 and not args.calib_data:
        ap.error("--fp8 needs --calib-data (a LLaVA-format JSON of samples like the ones you will serve)")
    if not args.fp8 and (args.calib_data or args.calib_images):
        ap.error("--calib-data / --calib-images only calibrate an FP8 export: add --fp8")
    if args.calib_samples < 1:
        ap.error("--calib-samples must be at least 1")

    from nemo_neva.export.hf import UnsupportedCheckpoint, export_nemo_to_hf, export_nemo_to_hf_fp8

    try:
        if args.fp8:
            out = export_nemo_to_hf_fp8(args.nemo_path, args.output_dir, args.calib_data, args.calib_images,
                                        args.calib_samples, args.dtype, args.engine)
        else:
            out = export_nemo_to_hf(args.nemo_path, args.output_dir, args.dtype, args.engine)
    except (UnsupportedCheckpoint, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # the .nemo restore may start distributed helpers; keep the guard
    sys.exit(main())
