#!/usr/bin/env bash
# TensorRT-LLM check for a machine with an NVIDIA GPU and TensorRT-LLM installed (it installs nothing).
#
#   NEMO=path/to/model.nemo scripts/trtllm_gpu_check.sh
#   NEMO=... DTYPE=float16 IMAGE=my.png QUESTION="What colour is the shape?" PYTHON=.venv/bin/python scripts/trtllm_gpu_check.sh
#
# 1. scripts/export_to_trtllm.py --build: TensorRT-LLM checkpoint + vision ONNX, then the LLM engine (prompt table
#    sized for the image tokens) and the vision engine. Fails if either build was skipped.
# 2. python -m nemo_neva.export.trtllm_check: vision-engine features vs the .nemo's encode_images, first-step
#    logits and greedy text of the LLM engine (image features fed through the prompt table) vs the .nemo model.
# Default NEMO: the model `make demo` writes (nemo_experiments/neva_finetune/neva_finetune.nemo).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
NEMO=${NEMO:-nemo_experiments/neva_finetune/neva_finetune.nemo}
DTYPE=${DTYPE:-bfloat16}
OUT=${OUT_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/neva_trtllm.XXXXXX")}
die() { echo "trtllm_gpu_check.sh: FAIL: $*" >&2; exit 1; }

[ -f "$NEMO" ] || die "no .nemo at $NEMO (set NEMO=..., or run 'make demo' first)"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')" \
    || die "this check needs a GPU"
"$PY" -c "import tensorrt_llm, tensorrt; print('tensorrt_llm', tensorrt_llm.__version__, '/ tensorrt', tensorrt.__version__)" \
    || die "tensorrt_llm / tensorrt are not importable (install TensorRT-LLM; this script installs nothing)"

echo "== export + build into $OUT"
"$PY" scripts/export_to_trtllm.py --nemo-path "$NEMO" --output-dir "$OUT" --dtype "$DTYPE" --build \
    | tee "$OUT/export.log" || die "export/build failed (see above)"
if grep -q '^skipped' "$OUT/export.log"; then die "an engine build was skipped (see $OUT/export.log)"; fi

echo "== engines vs .nemo"
CHECK=(--nemo-path "$NEMO" --export-dir "$OUT")
[ -n "${IMAGE:-}" ] && CHECK+=(--image "$IMAGE")
[ -n "${QUESTION:-}" ] && CHECK+=(--question "$QUESTION")
"$PY" -m nemo_neva.export.trtllm_check "${CHECK[@]}" || die "engine outputs differ from the .nemo (see above)"
echo "trtllm_gpu_check.sh: OK; export and engines in $OUT"
