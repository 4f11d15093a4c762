#!/usr/bin/env bash
# One command a GPU user runs: pretrain + finetune on CUDA in bf16 (local spec; TE spec and TE + FP8 when
# transformer_engine imports), save -> restore -> batched generation, HF export vs the .nemo, tokens/s and MFU,
# ending with one summary table (exit 1 when a row FAILs). Under 10 minutes on one H100.
#
#   scripts/gpu_check.sh                    # in an environment that has nemo_neva's dependencies
#   scripts/gpu_check.sh --wheels DIR       # a bare host (Python 3.12, torch, transformers, lightning,
#                                           # safetensors, onnx): installs DIR (made by scripts/gpu_wheels.sh
#                                           # where the package index is reachable) into a temporary folder first
#   scripts/gpu_check.sh --dry-run [...]    # the same on CPU with tiny sizes (the test suite runs this)
# Other options go to scripts/gpu_check.py (--out DIR, --steps N, --skip-te). PYTHON picks the interpreter.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WHEELS=""
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS=${2:?"--wheels needs a folder"}; shift 2 ;;
        --wheels=*) WHEELS=${1#*=}; shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
if [ -n "$WHEELS" ]; then
    [ -d "$WHEELS" ] || { echo "gpu_check.sh: --wheels $WHEELS is not a folder; make it with scripts/gpu_wheels.sh" >&2; exit 2; }
    "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
        || { echo "gpu_check.sh: the wheels are for Python 3.12; $PY is $("$PY" -V 2>&1) (set PYTHON=...)" >&2; exit 2; }
    "$PY" "$ROOT/scripts/gpu_check_report.py" --wheels "$WHEELS" >&2 || exit 2
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/neva_gpu_site.XXXXXX")
    echo "gpu_check.sh: installing $WHEELS into $SITE (no index, no dependencies resolved)" >&2
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl >&2
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's nemo_neva
fi
exec "$PY" "$ROOT/scripts/gpu_check.py" "${ARGS[@]}"
