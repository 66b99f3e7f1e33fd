# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
RUN_DIR_FILE := results/.last-demo

.PHONY: demo test smoke lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	# torch first, pinned: a CPU build (see constraints.txt); never a CUDA download.
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[dev,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/seqbench run configs/cpu.yaml --run-dir-file $(RUN_DIR_FILE)
	$(VENV)/bin/seqbench plot "$$(cat $(RUN_DIR_FILE))"
	@echo "Report: $$(cat $(RUN_DIR_FILE))/report.html (and report.md)"

test: $(STAMP)
	$(VENV)/bin/pytest -q

smoke: $(STAMP)
	$(VENV)/bin/seqbench run configs/smoke.yaml --run-dir-file results/.last-smoke
	$(VENV)/bin/seqbench plot "$$(cat results/.last-smoke)"

bench: $(STAMP)
	$(PY) benchmarks/ops_bench.py
	$(PY) benchmarks/peers.py

lint: $(STAMP)
	$(VENV)/bin/ruff check seqbench tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
