# Two commands matter: `make demo` (tiny pretrain -> finetune -> answer on CPU) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: install demo test test-slow learn
$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: setup.py | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python scripts/quickstart.py

test: install
	$(BIN)/python -m pytest -q tests

test-slow: install
	$(BIN)/python -m pytest -q -m slow tests

# Longer proof of learning on fresh generated data (held-out colour >= 75%; see the test's docstring); prints the scores.
learn: install
	$(BIN)/python -m pytest -q -s -m slow tests/model/test_learning.py -k colour_bar
