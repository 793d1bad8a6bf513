# Everything goes through the virtual environment in .venv, created on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SAT := $(VENV)/bin/sat
STAMP := $(VENV)/.installed-stamp
SHARED_DATA ?= ../shared/data
DATA_DIR ?= data

.PHONY: install test test-all lint bench bench-store data clean lock

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# Including slow tests.
test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

lint: $(STAMP)
	$(VENV)/bin/ruff check saliency_cache trainer pipelines tests bench

bench: bench-store

bench-store: $(STAMP)
	$(PY) bench/bench_store.py --out bench/results/store.json

data:
	@if ls $(SHARED_DATA)/*.tar.gz >/dev/null 2>&1; then \
	  mkdir -p $(DATA_DIR); \
	  for f in $(SHARED_DATA)/*.tar.gz; do \
	    echo "extracting $$f into $(DATA_DIR)/"; tar -xzf $$f -C $(DATA_DIR); \
	  done; \
	else echo "no datasets at $(SHARED_DATA): nothing to extract (tests that need them will skip)"; fi

lock: $(STAMP)
	@(echo "# Exact versions known to work together on this project's machines (Python 3.11, CPU)."; \
	  echo "# torch/torchvision are pinned as DEVELOPERS.md requires. Regenerate with: make lock"; \
	  $(PY) -m pip freeze --exclude-editable | grep -v -i '^sat-pipeline') > constraints.txt

clean:
	rm -rf $(VENV) runs stores .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
