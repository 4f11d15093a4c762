#!/usr/bin/env bash
# Fill DIR with the wheels scripts/gpu_check.sh installs on a GPU host that has only Python 3.12, torch,
# transformers, lightning, safetensors and onnx/onnxruntime, and no network. Run it where the package index is
# reachable, then carry DIR (under 64 MiB) and the checkout to the GPU host:
#
#   scripts/gpu_wheels.sh DIR            # MCORE=0.16.1 scripts/gpu_wheels.sh DIR: another megatron-core
#   scripts/gpu_check.sh --wheels DIR    # on the GPU host
#
# Wheels for CPython 3.12 / manylinux x86_64 whatever Python runs this (pip download --python-version 3.12);
# sdist-only pure-Python packages (antlr4-python3-runtime) and nemo_neva itself are built here as py3 wheels.
# No torch, no Transformer Engine: those are the host's.
set -euo pipefail
DIR=${1:?usage: scripts/gpu_wheels.sh DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
REQS=$(mktemp)
trap 'rm -rf "$REQS" "${SRC:-}"' EXIT
grep -v '^\s*#' "$ROOT/scripts/gpu_wheels.txt" | grep . > "$REQS"
if [ -n "${MCORE:-}" ]; then sed -i "s/^megatron-core==.*/megatron-core==$MCORE/" "$REQS"; fi
SDIST_ONLY='^antlr4-python3-runtime=='
grep -v "$SDIST_ONLY" "$REQS" | "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 -d "$DIR" -r /dev/stdin
grep "$SDIST_ONLY" "$REQS" | "$PY" -m pip wheel -q --no-deps -w "$DIR" -r /dev/stdin
# nemo_neva from this checkout (tracked and untracked files, not the ignored ones), built outside the tree
SRC=$(mktemp -d)
git -C "$ROOT" ls-files -co --exclude-standard -z | (cd "$ROOT" && tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$SRC"
rm -f "$DIR"/nemo_neva-*.whl
"$PY" -m pip wheel -q --no-deps -w "$DIR" "$SRC"
"$PY" "$ROOT/scripts/gpu_check_report.py" --wheels "$DIR"
