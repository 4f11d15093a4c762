#!/usr/bin/env bash
# GPU smoke test for a machine with an NVIDIA GPU (Hopper for the FP8 runs). Installs nothing: run it inside
# an environment that already has this package, torch with CUDA, and transformer_engine.
#
#   scripts/gpu_smoke.sh                 # from the repository root (or anywhere: it cds there)
#   STEPS=30 PYTHON=.venv/bin/python scripts/gpu_smoke.sh
#
# Runs examples/neva_pretrain.py for $STEPS steps on the shipped demo data with a medium LM (LM unfrozen, so
# weight gradients go through the FP8 GEMMs too):
#   tp1_bf16      megatron-core local spec, bf16 params
#   tp1_te_bf16   Transformer Engine spec, bf16 (isolates TE from FP8)
#   tp1_te_fp8    Transformer Engine spec, model.fp8=hybrid (delayed scaling)
#   tp2_*         the same at TP=2 + sequence parallel via torchrun, when 2+ GPUs are visible
# and prints, per run: first/last train loss, median tokens/s (after warm-up) and peak allocated memory.
# Fails (non-zero exit, message on stderr) when no GPU is visible, transformer_engine is missing, a run
# fails, or a loss is not finite.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STEPS=${STEPS:-20}
die() { echo "gpu_smoke.sh: FAIL: $*" >&2; exit 1; }

"$PY" - <<'EOF' || die "no usable CUDA GPU (see above); this script only makes sense on a GPU machine"
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False (CPU-only torch build, no driver, or CUDA_VISIBLE_DEVICES empty)")
cap = torch.cuda.get_device_capability(0)
print(f"GPU: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}")
if cap < (8, 9):
    print("WARNING: FP8 needs compute capability >= 8.9 (Ada/Hopper); the fp8 runs will fail here", file=sys.stderr)
EOF

"$PY" -c "import transformer_engine, transformer_engine.pytorch as te; print('transformer_engine', transformer_engine.__version__)" \
    || die "transformer_engine is not importable: the TE/FP8 runs cannot happen (install it; this script installs nothing)"

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
OUT=${OUT_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/neva_gpu_smoke.XXXXXX")}
mkdir -p "$OUT"

# Medium LM so the GEMMs mean something; demo tokenizer/data, random-init vision tower from the config.
COMMON=(
    trainer.max_steps="$STEPS" trainer.precision=bf16-true trainer.log_every_n_steps=1
    exp_manager.create_checkpoint_callback=false
    model.mm_cfg.llm.freeze=false
    model.num_layers=8 model.hidden_size=1024 model.ffn_hidden_size=4096 model.num_attention_heads=16
    model.encoder_seq_length=256 model.micro_batch_size=8 model.global_batch_size=16
)

summarize() {  # $1 = run name: read the TensorBoard scalars exp_manager wrote
    "$PY" - "$OUT/$1" "$1" <<'EOF'
import glob, math, statistics, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
folder, name = sys.argv[1], sys.argv[2]
files = sorted(glob.glob(f"{folder}/**/events.out.tfevents*", recursive=True))
if not files:
    sys.exit(f"{name}: no TensorBoard events under {folder}")
acc = EventAccumulator(files[-1]); acc.Reload()
def series(tag):
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []
loss, tps, mem = series("train_loss"), series("tokens_per_sec"), series("peak_mem_gib")
if not loss or not all(math.isfinite(v) for v in loss):
    sys.exit(f"{name}: train_loss missing or not finite: {loss[:5]}...")
steady = tps[3:] or tps
print(f"{name:<14} loss {loss[0]:.4f} -> {loss[-1]:.4f} ({len(loss)} steps)  "
      f"tokens/s {statistics.median(steady):,.0f} (median, per DP rank)  "
      f"peak mem {max(mem) if mem else float('nan'):.2f} GiB")
EOF
}

run() {  # $1 = name, $2 = processes, rest = overrides
    local name=$1 nproc=$2; shift 2
    local launcher=("$PY")
    if [ "$nproc" -gt 1 ]; then
        launcher=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc")
    fi
    echo "== $name: ${launcher[*]} examples/neva_pretrain.py $*"
    if ! "${launcher[@]}" examples/neva_pretrain.py "${COMMON[@]}" name="$name" exp_manager.exp_dir="$OUT/$name" \
        trainer.devices="$nproc" "$@" >"$OUT/$name.log" 2>&1; then
        tail -n 40 "$OUT/$name.log" >&2
        die "$name failed (full log: $OUT/$name.log)"
    fi
    summarize "$name" | tee -a "$OUT/summary.txt" || die "$name: could not read its metrics"
}

run tp1_bf16 1
run tp1_te_bf16 1 model.transformer_engine=true
run tp1_te_fp8 1 model.transformer_engine=true model.fp8=hybrid
if [ "$NGPU" -ge 2 ]; then
    TP2=(model.tensor_model_parallel_size=2 model.sequence_parallel=true)
    run tp2_bf16 2 "${TP2[@]}"
    run tp2_te_fp8 2 "${TP2[@]}" model.transformer_engine=true model.fp8=hybrid
else
    echo "(1 GPU visible: TP=2 runs skipped)"
fi
# Packed sequences on the TE path: rows go to TE's attention as THD + PackedSeqParams (cu_seqlens), so every
# sample's losses must equal the sample alone; then a short packed pretrain run must keep a finite loss.
echo "== packed THD attention (TE): per-sample losses vs unpacked"
"$PY" -m pytest -q -p no:cacheprovider tests/model/test_packing_te.py >"$OUT/packed_te_test.log" 2>&1 \
    || { tail -n 40 "$OUT/packed_te_test.log" >&2; die "packed THD test failed (log: $OUT/packed_te_test.log)"; }
grep -q "1 passed" "$OUT/packed_te_test.log" || die "packed THD test did not run (skipped?): $OUT/packed_te_test.log"
run tp1_te_packed 1 model.transformer_engine=true model.data.packed_sequence=true
echo "gpu_smoke.sh: OK; logs and summary in $OUT"
