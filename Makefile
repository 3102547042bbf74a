# Two commands for a newcomer: `make demo` and `make test`. Each sets itself up.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mlsd-installed
# First interpreter >= 3.11 on PATH (macOS's /usr/bin/python3 may be older).
PYTHON ?= $(shell for p in python3.12 python3.11 python3.13 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; done)
# On Linux this resolves to the local CPU build; on macOS to PyPI's MPS build.
TORCH_SPEC ?= torch==2.13.0
# pip prints one harmless warning per package for this machine's file:// mirrors; keep the log readable.
QUIET_PIP := { grep -v "^WARNING: Location 'file:" || true; }

.PHONY: setup test lint demo convert tui bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "mlsd needs Python >= 3.11 (none found on PATH)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" 2>&1 | $(QUIET_PIP)
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | $(QUIET_PIP)
	@touch $(STAMP)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check mlsd converters tui tests tools bench

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/mlsd demo

# Retrain the built-in demo model, its LoRA and metrics into mlsd/data/demo/ (CPU, seeded; stage cache in build/).
demo-model: setup
	HF_HUB_OFFLINE=1 TQDM_DISABLE=1 $(BIN)/python -m mlsd.demo.train

# make convert MODEL=<name|path> [LORA=name:0.8,other:0.5] [ARGS="--chunks 3 --quantize-bits 6"]
comma := ,
convert: setup
	@test -n "$(MODEL)" || { echo "usage: make convert MODEL=<name|path> [LORA=name:w,...] [ARGS='...']"; exit 2; }
	HF_HUB_OFFLINE=1 $(BIN)/mlsd convert "$(MODEL)" $(foreach l,$(subst $(comma), ,$(LORA)),--lora "$(l)") $(ARGS)

# make tui [ARGS="--models-dir ~/stable-diffusion-webui/models --model v1-5-pruned-emaonly"]
tui: setup
	HF_HUB_OFFLINE=1 $(BIN)/mlsd tui $(ARGS)

# make bench [ARGS="--only generation,conversion,quantized,executor"]: ~30 min on 2 cores, writes docs/benchmarks.md
bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
