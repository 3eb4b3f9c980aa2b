# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: on a CPU-only machine this takes the CPU wheel, not a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/lmforge quickstart

# One pytest-xdist worker per core, at most 4 (on 2 cores: 5.7 minutes against 10 in one process).
test: setup
	$(BIN)/python -m pytest -m "not slow and not gpu" -q -n auto --maxprocesses 4

test-slow: setup
	$(BIN)/python -m pytest -m "slow" -q

bench: setup
	$(BIN)/python bench/train_throughput.py --config configs/quickstart_moe.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache
