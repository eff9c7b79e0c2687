# The README's commands. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Train the embedded default (Python stdlib source, byte-level) with FSDP over 2 CPU
# processes, and print a sample. One thread per process: 2 processes x 2 threads on 2 cores
# would oversubscribe them.
NPROC ?= 2
demo: install
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m scaling.train recipes/cpu_demo.yaml

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python -m scaling.bench

clean:
	rm -rf $(VENV) runs data/embedded
