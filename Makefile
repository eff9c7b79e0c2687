# The README's commands. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow test-all bench gpu-check install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Train the embedded default (Python stdlib source, byte-level) with FSDP over 2 CPU
# processes, print a sample, then the validation losses as a table and the curves as a PNG next to the run.
# One thread per process: 2 processes x 2 threads on 2 cores would oversubscribe them.
# scaling.launch is torchrun whose failures (a bad key, Ctrl-C) end in our one line, not its traceback.
# ARGS: more --section.key=value overrides (tests/test_readme.py shrinks the demo with them).
NPROC ?= 2
DEMO_RUN ?= runs/cpu_demo
demo: install
	OMP_NUM_THREADS=1 $(BIN)/python -m scaling.launch --standalone --nproc_per_node=$(NPROC) -m scaling.train recipes/cpu_demo.yaml \
		--logging.run_dir=$(DEMO_RUN) $(ARGS)
	$(BIN)/python -m scaling.plot $(DEMO_RUN) --table -o $(DEMO_RUN)/curves.png

# The suite in two tiers: `test` (under 15 minutes on 2 cores) and `test-slow` (the Slurm
# time-limit round trip and the rest of the kill/reshard/accumulation matrices, marked slow).
# CI runs both: test-all.
test: install
	$(BIN)/python -m pytest -q tests -m "not slow" --durations=20

test-slow: install
	$(BIN)/python -m pytest -q tests -m slow --durations=10

test-all: test test-slow

bench: install
	$(BIN)/python -m scaling.bench

# The GPU acceptance run (sized for minutes on one GPU, not yet timed on one; on a CPU it runs its CPU parts only).
# GPU machines often have torch but no network: this runs the checkout in place with whatever
# Python has torch (the .venv if there is one), installing nothing.
gpu-check:
	PYTHONPATH=. $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m scaling.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) runs data/embedded
