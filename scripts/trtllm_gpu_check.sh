#!/usr/bin/env bash
# TensorRT-LLM check for a machine with an NVIDIA GPU and TensorRT-LLM installed (it installs nothing).
#
#   NEMO=path/to/model.nemo scripts/trtllm_gpu_check.sh
#   NEMO=... DTYPE=float16 IMAGE=my.png QUESTION="What colour is the shape?" PYTHON=.venv/bin/python scripts/trtllm_gpu_check.sh
#
# 1. scripts/export_to_trtllm.py --build: TensorRT-LLM checkpoint + vision ONNX, then the LLM engine (prompt table
#    sized for MAX_IMAGES images of the most image tokens) and the vision engine. Fails if either build was skipped.
# 2. python -m nemo_neva.export.trtllm_check: vision-engine features vs the .nemo's encode_images, first-step
#    logits and greedy text of the LLM engine (image features fed through the prompt table) vs the .nemo model.
#    A tiled (anyres, model.mm_cfg.image_tiling) .nemo is checked on two images of different sizes (IMAGE and
#    its top half): every tile through the vision engine, the table packed with the exported image_newline.
# 3. Through Triton: examples/neva_triton.py trt_engine_dir=OUT on free loopback ports; scripts/query_triton.py
#    with step 2's images over HTTP and gRPC, and MAX_BATCH concurrent copies of the request (one dynamic batch,
#    one prompt table for the batch), must all print the engine's greedy text of step 2; a refused request must
#    leave the server up; SIGTERM must stop it with no tritonserver left. SKIP_TRITON=1 skips this step.
# Not run in this repository (no GPU / TensorRT-LLM on its machines): the tiled path is covered there by CPU tests
# of the same code with onnxruntime and a reference forward (tests/export/test_trtllm_tiling.py,
# tests/serving/test_triton_trtllm_tiling.py).
# Default NEMO: the model `make demo` writes (nemo_experiments/neva_finetune/neva_finetune.nemo).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
NEMO=${NEMO:-nemo_experiments/neva_finetune/neva_finetune.nemo}
DTYPE=${DTYPE:-bfloat16}
MAX_BATCH=${MAX_BATCH:-2}
MAX_IMAGES=${MAX_IMAGES:-2}  # per request: a tiled model's check sends two
IMAGE=${IMAGE:-data/shapes_demo/images/eval_00000.png}
QUESTION=${QUESTION:-What is in the image?}
MAX_NEW=16   # nemo_neva.export.trtllm_check's --max-new-tokens default
OUT=${OUT_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/neva_trtllm.XXXXXX")}
die() { echo "trtllm_gpu_check.sh: FAIL: $*" >&2; exit 1; }

[ -f "$NEMO" ] || die "no .nemo at $NEMO (set NEMO=..., or run 'make demo' first)"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')" \
    || die "this check needs a GPU"
"$PY" -c "import tensorrt_llm, tensorrt; print('tensorrt_llm', tensorrt_llm.__version__, '/ tensorrt', tensorrt.__version__)" \
    || die "tensorrt_llm / tensorrt are not importable (install TensorRT-LLM; this script installs nothing)"

echo "== export + build into $OUT"
"$PY" scripts/export_to_trtllm.py --nemo-path "$NEMO" --output-dir "$OUT" --dtype "$DTYPE" --build \
    --max-batch-size "$MAX_BATCH" --max-images-per-request "$MAX_IMAGES" | tee "$OUT/export.log" \
    || die "export/build failed (see above)"
if grep -q '^skipped' "$OUT/export.log"; then die "an engine build was skipped (see $OUT/export.log)"; fi

echo "== engines vs .nemo"
"$PY" -m nemo_neva.export.trtllm_check --nemo-path "$NEMO" --export-dir "$OUT" --image "$IMAGE" \
    --question "$QUESTION" --max-new-tokens "$MAX_NEW" --images-out "$OUT/check_images" | tee "$OUT/check.log" \
    || die "engine outputs differ from the .nemo (see above)"

if [ -n "${SKIP_TRITON:-}" ]; then
    echo "trtllm_gpu_check.sh: OK (Triton step skipped); export and engines in $OUT"
    exit 0
fi

echo "== the engines through Triton (examples/neva_triton.py trt_engine_dir=$OUT)"
# The engine's greedy text, as trtllm_check printed it: "engine : '...'" (a Python repr).
EXPECTED=$(grep '^engine : ' "$OUT/check.log" | head -1 | sed 's/^engine : //' \
    | "$PY" -c "import ast, sys; print(ast.literal_eval(sys.stdin.read().strip()))") \
    || die "no engine text in $OUT/check.log"
read -r HTTP_PORT GRPC_PORT METRICS_PORT < <("$PY" - <<'PORTS'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
PORTS
)
"$PY" examples/neva_triton.py trt_engine_dir="$OUT" triton.http_port="$HTTP_PORT" triton.grpc_port="$GRPC_PORT" \
    triton.metrics_port="$METRICS_PORT" triton.max_batch_size="$MAX_BATCH" triton.max_queue_delay_ms=500 \
    > "$OUT/triton.log" 2>&1 &
SERVER=$!
stop_server() { kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }
trap stop_server EXIT
for _ in $(seq 600); do
    grep -q '^serving model' "$OUT/triton.log" && break
    kill -0 "$SERVER" 2>/dev/null || die "the Triton server exited during start-up (see $OUT/triton.log)"
    sleep 1
done
grep -q '^serving model' "$OUT/triton.log" || die "the Triton server did not start in 10 minutes ($OUT/triton.log)"

IMAGE_ARGS=()  # step 2's images, in its order: the Triton answer must be that request's
for f in "$OUT"/check_images/image_*.png; do IMAGE_ARGS+=(--image "$f"); done
[ "${#IMAGE_ARGS[@]}" -gt 0 ] || die "trtllm_check wrote no images to $OUT/check_images"
QUERY=("$PY" scripts/query_triton.py "${IMAGE_ARGS[@]}" --prompt "$QUESTION" --max-output-len "$MAX_NEW")
GOT=$("${QUERY[@]}" --url "127.0.0.1:$HTTP_PORT") || die "HTTP query failed"
[ "$GOT" = "$EXPECTED" ] || die "Triton over HTTP answered '$GOT', the engine '$EXPECTED'"
GOT=$("${QUERY[@]}" --protocol grpc --url "127.0.0.1:$GRPC_PORT") || die "gRPC query failed"
[ "$GOT" = "$EXPECTED" ] || die "Triton over gRPC answered '$GOT', the engine '$EXPECTED'"
echo "HTTP and gRPC: '$GOT'"

"${QUERY[@]}" --url "127.0.0.1:$HTTP_PORT" --concurrent "$MAX_BATCH" > "$OUT/concurrent.txt" \
    || die "concurrent queries failed"
ALL=$EXPECTED
for _ in $(seq 2 "$MAX_BATCH"); do ALL=$(printf '%s\n%s' "$ALL" "$EXPECTED"); done
[ "$(cat "$OUT/concurrent.txt")" = "$ALL" ] \
    || die "$MAX_BATCH concurrent queries answered '$(cat "$OUT/concurrent.txt")', the engine '$EXPECTED' each"
grep -E "answered [2-9][0-9]* request\(s\)" "$OUT/triton.log" > /dev/null \
    && echo "$MAX_BATCH concurrent queries: batched, all '$EXPECTED'" \
    || echo "$MAX_BATCH concurrent queries: all '$EXPECTED' (note: they did not meet in one batch)"

if "${QUERY[@]}" --url "127.0.0.1:$HTTP_PORT" --temperature -1 2> "$OUT/refused.txt"; then
    die "a request with temperature=-1 was answered"
fi
grep -q "input 'temperature'" "$OUT/refused.txt" || die "refusal does not name the input: $(cat "$OUT/refused.txt")"
GOT=$("${QUERY[@]}" --url "127.0.0.1:$HTTP_PORT") || die "the server stopped answering after a refused request"

CHILDREN=$(pgrep -P "$SERVER" || true)   # tritonserver, and below it the Python-backend stub
for pid in $CHILDREN; do CHILDREN="$CHILDREN $(pgrep -P "$pid" || true)"; done
ps -o comm= -p "$(echo $CHILDREN | tr ' ' ',')" | grep -q tritonserver || die "no tritonserver under the server"
kill -TERM "$SERVER"
wait "$SERVER" || die "the Triton server exited with status $? on SIGTERM (see $OUT/triton.log)"
trap - EXIT
sleep 2  # PyTriton's multiprocessing resource tracker finishes its clean-up after the server exits
for pid in $CHILDREN; do
    ! kill -0 "$pid" 2>/dev/null || die "process $pid ($(ps -o comm= -p "$pid")) outlived the server"
done
echo "Triton: OK (HTTP, gRPC, $MAX_BATCH concurrent, refusal, clean SIGTERM); log $OUT/triton.log"
echo "trtllm_gpu_check.sh: OK; export and engines in $OUT"
