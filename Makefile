# The README's commands. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow test-all test-compat bench gpu-check install clean

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

# The GPU image's versions: torch 2.11 on Python 3.10, the oldest we support, in a venv of its own
# (.venv-compat), running the tests that touch what changed between torch releases: every parallel
# layout, resume, `bench comm` (in the README's commands), gpu_check's CPU parts and the launcher's
# stop-save grace (through its own python: the launchers take $PYTHON). Not part of test-all.
# On Linux x86_64 PyPI's torch 2.11 is the CUDA 13 build (5 GB in the venv with its nvidia packages);
# where download.pytorch.org is reachable, COMPAT_INDEX=--index-url=https://download.pytorch.org/whl/cpu
# takes the CPU build instead.
COMPAT_VENV ?= .venv-compat
COMPAT_TORCH ?= 2.11.0
COMPAT_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) python3.10)
COMPAT_INDEX ?=
COMPAT_TESTS := \
	tests/test_compat.py \
	tests/test_parallel.py::test_layout_reproduces_single_process_run \
	tests/test_checkpoint.py::test_sigkilled_run_resumes_from_the_newest_checkpoint_with_bit_identical_losses \
	tests/test_checkpoint.py::test_checkpoint_resumes_under_another_layout \
	tests/test_checkpoint.py::test_stop_signal_saves_at_a_step_boundary_and_the_same_command_resumes \
	tests/test_readme.py::test_the_readme_commands_run_in_order \
	tests/test_gpu_check.py \
	tests/test_launch.py::test_a_stop_save_longer_than_torchruns_30_s_still_commits_and_the_requeued_job_resumes \
	tests/test_launch_exit_codes.py::test_the_launcher_restarts_a_crash_but_not_what_would_fail_the_same_way_again \
	tests/test_launch_exit_codes.py::test_a_clean_stop_before_a_restart_does_not_make_the_attempt_after_it_a_clean_stop \
	tests/test_elastic.py::test_two_torchrun_nodes_with_a_minimum_of_one_carry_on_when_one_dies
# The project's requirements, dev extra included, all but its torch pin.
NOT_TORCH := import re, importlib.metadata as m; print(*[r.split(";")[0] for r in m.requires("scaling") \
	if re.match(r"[\w.-]+", r)[0] != "torch" and ("extra ==" not in r or "extra == \"dev\"" in r)])

$(COMPAT_VENV)/.installed: pyproject.toml
	$(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q torch==$(COMPAT_TORCH) $(COMPAT_INDEX)
	$(COMPAT_VENV)/bin/pip install -q --no-deps -e .
	@echo "(pip will say that scaling requires another torch: expected here)"
	$(COMPAT_VENV)/bin/pip install -q $$($(COMPAT_VENV)/bin/python -c '$(NOT_TORCH)')
	$(COMPAT_VENV)/bin/python -c 'import torch; assert torch.__version__.startswith("$(COMPAT_TORCH)"), torch.__version__'
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	PYTHON=$(abspath $(COMPAT_VENV)/bin/python) $(COMPAT_VENV)/bin/python -m pytest -q $(COMPAT_TESTS) --durations=10

bench: install
	$(BIN)/python -m scaling.bench

# The GPU acceptance run (sized for minutes on one GPU, not yet timed on one; on a CPU it runs its CPU parts only).
# GPU machines often have torch but no network: this runs the checkout in place with whatever
# Python has torch (the .venv if there is one), installing nothing.
gpu-check:
	PYTHONPATH=. $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m scaling.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) $(COMPAT_VENV) runs data/embedded
