# ctrlgen: `make demo` and `make test` work on a fresh machine (they create .venv themselves).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch: the CPU wheel when it lies on this disk (fast, small); else whatever pip resolves within pyproject's cap.
TORCH ?= $(shell ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1 && echo "torch==2.13.0" || echo "torch<=2.14.1")
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast test-slow test-slurm clean

$(BIN)/.ready: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install -q "$(TORCH)" 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch, lightning, webdataset, wandb, torchmetrics, diffusers, transformers, peft"
	touch $@

venv: $(BIN)/.ready

# `make demo`: every implemented method's demo (`ctrlgen demo list`) into demo_runs/<method>, then one table of all
# their claims (`ctrlgen demo table`); fails if a demo fails or any claim is not met. `make demo METHOD=ecm`: one.
METHOD ?=
DEMO_DIR ?= demo_runs
demo: venv
	@methods="$(METHOD)"; [ -n "$$methods" ] || methods="$$($(BIN)/ctrlgen demo list)" || exit 1; \
	rc=0; dirs=""; \
	for m in $$methods; do \
	  HF_HUB_OFFLINE=1 $(BIN)/ctrlgen demo $$m --out $(DEMO_DIR)/$$m || rc=$$?; dirs="$$dirs $(DEMO_DIR)/$$m"; \
	done; \
	echo "== claims of every demo ($$methods) =="; \
	$(BIN)/ctrlgen demo table $$dirs || rc=$$((rc ? rc : $$?)); \
	exit $$rc

# All tiers that can run on this machine: fast + slow (CPU DDP) + slurm (the suite brings the local single-node cluster
# up and down, CTRLGEN_SLURM=1: the default for root with apt-get; elsewhere the tier uses a running cluster or skips
# saying why; CTRLGEN_SLURM=0 to skip it).
# Fast and slow tiers run in JOBS pytest-xdist workers, one torch thread each (much of the suite waits on subprocesses
# that import Lightning on one core); the slurm tier runs alone afterwards: its jobs time Slurm's own daemons and must
# not compete with other tests for the cores. Both phases always run; the target fails if either did. JOBS=0: serial.
JOBS ?= 2
CTRLGEN_SLURM ?= $(shell [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && echo 1 || echo 0)
export CTRLGEN_SLURM
test: venv
	@rc=0; \
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/pytest -m "not gpu and not slurm" -n $(JOBS) $(PYTEST_ARGS) || rc=$$?; \
	HF_HUB_OFFLINE=1 $(BIN)/pytest -m slurm $(PYTEST_ARGS) || rc=$$((rc ? rc : $$?)); \
	exit $$rc

test-fast: venv
	HF_HUB_OFFLINE=1 $(BIN)/pytest -m "not gpu and not slow and not slurm" $(PYTEST_ARGS)

test-slow: venv
	HF_HUB_OFFLINE=1 $(BIN)/pytest -m slow $(PYTEST_ARGS)

test-slurm: venv
	HF_HUB_OFFLINE=1 $(BIN)/pytest -m slurm $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_runs runs .pytest_cache
