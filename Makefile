# kvcompress: `make install && make test`.
PYTHON ?= python3
VENV ?= .venv
# Torch first, pinned: an unpinned torch would pull a multi-GB CUDA wheel. On a GPU box: make install TORCH=torch==2.11.0
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: help install test test-all lint format smoke quickstart bench reproduce clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed -e 's/:.*## /\t/' -e 's/$$(TORCH)/$(TORCH)/'

install:  ## create .venv and install torch ($(TORCH)) then the package with dev extras
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"

test:  ## fast offline CPU tests (no slow, no gpu); says how many need KVCOMPRESS_DATA_DIR
	$(BIN)/pytest -q

test-all:  ## every test, slow and gpu included (gpu tests skip without CUDA)
	$(BIN)/pytest -q -m ""

lint:  ## ruff lint and format check; mypy on the whole kvcompress package
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format:  ## ruff format and autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

smoke:  ## a tiny end-to-end training run
	$(BIN)/python -m kvcompress.train debug=smoke

quickstart:  ## the first real run: a small Pythia learns WikiText-2 in minutes on a CPU
	$(BIN)/python -m kvcompress.train experiment=quickstart

bench:  ## decode TTFT/TPOT of every cache kind vs KV, training vs HF (CPU preset; writes outputs/bench/bench.json)
	$(BIN)/python -m kvcompress.bench

SCALE ?= mini
TABLES ?=
reproduce:  ## rerun the seed reports' tables over seeds (mini: 2, paper: 3), write REPRODUCTION.md (SCALE=mini|paper, TABLES=003,004; resumes)
	$(BIN)/python -m kvcompress.reproduce --scale $(SCALE) $(if $(TABLES),--tables $(TABLES)) $(REPRODUCE_ARGS)

clean:  ## remove run outputs and caches
	rm -rf outputs multirun .pytest_cache .ruff_cache
