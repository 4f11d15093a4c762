"""Export a NeVA .nemo for TensorRT-LLM: LLM checkpoint (config.json + rank{N}.safetensors), vision ONNX.

    neva-export-trtllm --nemo-path IN.nemo --output-dir OUT [--tp-size 2] [--dtype bfloat16]
        [--fp8 [--calib-data LLAVA.json --calib-image-folder DIR]] [--build]

--build also builds the engines where TensorRT-LLM / TensorRT are installed, and says what it skipped
elsewhere (exit status 0). A tiled model (model.mm_cfg.image_tiling) exports too: the prompt table is sized for
its largest grid, the vision engine's batch for every tile. See docs/TRTLLM.md for the folder layout and the
prompt-table contract.
"""
from nemo_neva.cli import quiet_logs

quiet_logs()  # before NeMo / megatron-core are imported

import argparse
import os
import sys

from nemo_neva.cli import user_errors


@user_errors
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nemo-path", required=True, help="the .nemo to export (any TP/PP layout)")
    ap.add_argument("--output-dir", required=True, help="export folder (llm/, vision/, tokenizer/, ...)")
    ap.add_argument("--tp-size", type=int, default=1, help="inference tensor-parallel size (rank files)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="bfloat16",
                    help="dtype of the LLM checkpoint and of the engines")
    ap.add_argument("--fp8", action="store_true", help="FP8 (E4M3, per-tensor) weights + calibrated "
                                                       "activation scaling factors")
    ap.add_argument("--calib-data", default=None, help="--fp8: LLaVA-format JSON of calibration samples "
                                                       "(default: the .nemo's training data, if present)")
    ap.add_argument("--calib-image-folder", default=None, help="--fp8: image folder of --calib-data")
    ap.add_argument("--calib-samples", type=int, default=16, help="--fp8: calibration samples")
    ap.add_argument("--build", action="store_true", help="also build the TensorRT engines (needs TensorRT-LLM)")
    ap.add_argument("--max-batch-size", type=int, default=1, help="--build: engine batch size")
    ap.add_argument("--max-input-len", type=int, default=None,
                    help="--build: prompt tokens incl. image tokens (default 1024; a tiled model: room for "
                         "--max-images-per-request images of its largest grid + 512 text tokens, if more)")
    ap.add_argument("--max-output-len", type=int, default=256, help="--build: generated tokens")
    ap.add_argument("--max-images-per-request", type=int, default=1, help="--build: sizes the prompt table")
    args = ap.parse_args(argv)
    if args.tp_size < 1 or args.calib_samples < 1:
        raise ValueError("--tp-size and --calib-samples must be >= 1")

    from nemo_neva.export.trtllm import export_nemo_to_trtllm

    meta = export_nemo_to_trtllm(args.nemo_path, args.output_dir, args.tp_size, args.dtype, args.fp8,
                                 args.calib_data, args.calib_image_folder, args.calib_samples)
    print(f"wrote {args.output_dir}: llm/ ({meta['architecture']}, {args.dtype}, tp={args.tp_size}"
          f"{', FP8' if args.fp8 else ''}), {meta['vision_onnx']}, tokenizer/, nemo_neva_export.json")
    if args.build:
        from nemo_neva.export.trtllm_build import build_engines

        built, skipped = build_engines(args.output_dir, meta, args.max_batch_size, args.max_input_len,
                                       args.max_output_len, args.max_images_per_request)
        for line in built:
            print(f"built {line}")
        for line in skipped:
            print(f"skipped {line}")
    return 0


if __name__ == "__main__":  # the .nemo restore may start distributed helpers; keep the guard
    sys.exit(main())
