# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
RUN_DIR_FILE := results/.last-demo
# Contract tests (tests/contract) run the real Python code of the CUDA libraries on the CPU: pinned, installed
# without compiling their CUDA extensions (*_SKIP_CUDA_BUILD) and without fetching a prebuilt wheel from outside
# PyPI (*_FORCE_BUILD), against the torch already in the venv (--no-build-isolation, --no-deps: mamba-ssm's own
# requirements include GPU-only packages). triton is needed as a plain wheel for mamba_ssm's Triton modules to import.
CONTRACT_STAMP := $(VENV)/.contract
CONTRACT_DEPS := einops==0.8.2 triton==3.5.1 wheel==0.48.0
CONTRACT_PKGS := mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0 flash-attn==2.8.3.post2
NO_CUDA_BUILD := MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
	CAUSAL_CONV1D_FORCE_BUILD=TRUE FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE

.PHONY: demo test smoke lint bench clean gpu-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	# torch first, pinned: a CPU build (see constraints.txt); never a CUDA download.
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[dev,bench]'
	touch $(STAMP)

$(CONTRACT_STAMP): $(STAMP) Makefile
	$(PIP_INSTALL) $(CONTRACT_DEPS)
	$(NO_CUDA_BUILD) $(PIP_INSTALL) --no-deps --no-build-isolation $(CONTRACT_PKGS)
	touch $(CONTRACT_STAMP)

demo: $(STAMP)
	$(VENV)/bin/seqbench run configs/cpu.yaml --run-dir-file $(RUN_DIR_FILE)
	$(VENV)/bin/seqbench plot "$$(cat $(RUN_DIR_FILE))"
	@echo "Report: $$(cat $(RUN_DIR_FILE))/report.html (and report.md)"

test: $(STAMP) $(CONTRACT_STAMP)
	$(VENV)/bin/pytest -q

smoke: $(STAMP)
	$(VENV)/bin/seqbench run configs/smoke.yaml --run-dir-file results/.last-smoke
	$(VENV)/bin/seqbench plot "$$(cat results/.last-smoke)"

bench: $(STAMP)
	$(PY) benchmarks/gemm.py
	$(PY) benchmarks/ops_bench.py
	$(PY) benchmarks/peers.py

# On a GPU machine with the cuda extra installed (README "Running on a GPU"); on a CPU it exits 2.
gpu-check: $(STAMP)
	$(VENV)/bin/seqbench gpu-check configs/gpu-check.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check seqbench tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
