# Everything goes through the virtual environment in .venv, created on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SAT := $(VENV)/bin/sat
STAMP := $(VENV)/.installed-stamp
SHARED_DATA ?= ../shared/data
DATA_DIR ?= data

.PHONY: install test test-all lint bench bench-store bench-precompute bench-train bench-loader bench-scale data clean lock \
        demo teacher precompute train eval report repro-tiny repro-flowers \
        repro-cifar10 repro-cifar10-maps repro-companions check-data

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

bench: bench-store bench-precompute bench-train bench-scale

bench-store: $(STAMP)
	$(PY) bench/bench_store.py --out bench/results/store.json

bench-precompute: $(STAMP)
	$(PY) bench/bench_precompute.py --out bench/results/precompute.json

bench-train: $(STAMP)
	$(PY) bench/bench_train.py --out bench/results/train.json

# The loader alone, in seconds (the map decode and augmentation on DEVICE: auto = cuda if present).
bench-loader: $(STAMP)
	$(PY) bench/bench_train.py --only loader --device $(DEVICE) --out bench/results/train-loader.json

# Stores of 10k, 100k and 1M samples: precompute, training start, loader and memory vs N.
bench-scale: $(STAMP)
	$(PY) bench/bench_scale.py --out bench/results/scale.json

# ---- the main job: the whole pipeline on synthetic data, CPU-sized --------------------------
demo: $(STAMP)
	$(SAT) demo --out runs/demo

# ---- the stages on real data (Tiny ImageNet boxes by default) ------------------------------
# Override any of these, e.g. `make precompute DATASET=oxford17 DATA=data/oxford17-flowers-seg WEAK=mask`.
DATASET ?= tiny-imagenet
DATA ?= $(DATA_DIR)/tiny-imagenet-20
IMAGE_SIZE ?= 32
WIDTH ?= 16
RUN ?= runs/tiny
TEACHER_MODE ?= standard
TEACHER_EPOCHS ?= 4
EPOCHS ?= 6
WEAK ?= box
WORKERS ?= 2
DEVICE ?= auto
DATA_ARGS = --dataset $(DATASET) --data-root $(DATA) --image-size $(IMAGE_SIZE)
TEACHER_CKPT = $(RUN)/teachers/$(TEACHER_MODE)/teacher.safetensors
GBP_MAP = resnet10-$(if $(filter adversarial,$(TEACHER_MODE)),adv,$(if $(filter sparse,$(TEACHER_MODE)),sparse,std))-gbp

$(DATA_DIR)/tiny-imagenet-20/wnids.txt:
	@test -f $(SHARED_DATA)/tiny-imagenet-20.tar.gz || { \
	  echo "no $(SHARED_DATA)/tiny-imagenet-20.tar.gz: set DATA= to your Tiny ImageNet folder"; exit 2; }
	mkdir -p $(DATA_DIR) && tar -xzf $(SHARED_DATA)/tiny-imagenet-20.tar.gz -C $(DATA_DIR)

# Extracts the shared Tiny ImageNet when DATA points at the default location and is missing.
check-data:
	@test -e $(DATA) || $(MAKE) --no-print-directory $(DATA_DIR)/tiny-imagenet-20/wnids.txt
	@test -e $(DATA) || { echo "dataset folder $(DATA) not found"; exit 2; }

teacher: $(STAMP) check-data
	$(SAT) teacher $(DATA_ARGS) --arch resnet10 --width $(WIDTH) --mode $(TEACHER_MODE) \
	  --epochs $(TEACHER_EPOCHS) --device $(DEVICE) --out $(RUN)/teachers/$(TEACHER_MODE)

precompute: $(STAMP) check-data
	@test -f $(TEACHER_CKPT) || $(MAKE) --no-print-directory teacher
	$(SAT) precompute $(DATA_ARGS) --store $(RUN)/store.zarr --teacher $(TEACHER_CKPT) --device $(DEVICE) \
	  --method gbp --weak $(WEAK) --workers $(WORKERS)
	$(SAT) cache verify $(RUN)/store.zarr
	$(SAT) cache ls $(RUN)/store.zarr

train: $(STAMP)
	@test -d $(RUN)/store.zarr || $(MAKE) --no-print-directory precompute
	$(SAT) train --store $(RUN)/store.zarr --mode sat --map $(GBP_MAP) --arch resnet10 \
	  --width $(WIDTH) --epochs $(EPOCHS) --sat-reach 0.5 --device $(DEVICE) --out $(RUN)/sat

eval: $(STAMP)
	@test -f $(RUN)/sat/checkpoints/last.safetensors || $(MAKE) --no-print-directory train
	$(SAT) eval --checkpoint $(RUN)/sat/checkpoints/last.safetensors --store $(RUN)/store.zarr \
	  --attacks pgd5,pgd20,pgd40,uniform,trades,saliency --eps 1,2,3,4 --device $(DEVICE)

report: $(STAMP)
	$(SAT) report $(patsubst %/eval/results.json,%,$(wildcard $(RUN)/*/eval/results.json)) --out $(RUN)/report

# The presets (pipelines/specs/*.yaml) on real data; VARIANT=full runs the paper's scale.
# repro-tiny is the comparison of docs/RESULTS.md (Tiny ImageNet-20, boxes as weak saliency).
VARIANT ?=
VARIANT_ARG = $(if $(VARIANT),--variant $(VARIANT))
repro-tiny: $(STAMP) check-data
	$(SAT) compare --preset tiny $(VARIANT_ARG) --data-root $(DATA) --device $(DEVICE) --out $(RUN)/repro$(VARIANT)

# SAT beside the companion papers' methods (sgt, gradnorm) on Tiny ImageNet-20: docs/RESULTS.md.
repro-companions: $(STAMP) check-data
	$(SAT) compare --preset companions $(VARIANT_ARG) --data-root $(DATA) --device $(DEVICE) --out $(RUN)/companions$(VARIANT)

repro-flowers: $(STAMP)
	$(SAT) compare --preset flowers $(VARIANT_ARG) --data-root $(or $(FLOWERS),$(DATA_DIR)/oxford17-flowers-seg) \
	  --device $(DEVICE) --out runs/flowers/repro$(VARIANT)

repro-cifar10: $(STAMP)
	$(SAT) compare --preset cifar10 $(VARIANT_ARG) --data-root $(or $(CIFAR10),$(DATA_DIR)/cifar10-jpeg) \
	  --device $(DEVICE) --out runs/cifar10/repro$(VARIANT)

repro-cifar10-maps: $(STAMP)
	$(SAT) compare --preset cifar10-maps $(VARIANT_ARG) --data-root $(or $(CIFAR10),$(DATA_DIR)/cifar10-jpeg) \
	  --device $(DEVICE) --out runs/cifar10-maps/repro$(VARIANT)

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
