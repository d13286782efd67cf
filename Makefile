# Two commands on a fresh machine: `make repro` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test repro clean-venv

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev,mnist]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

FASHION := /usr/share/datasets/fashion-mnist

# Real Fashion-MNIST images for the embedded suite come from Debian's dataset-fashion-mnist package.
$(FASHION):
	@command -v apt-get >/dev/null || { echo "need $(FASHION): install Debian's dataset-fashion-mnist"; exit 1; }
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

# `dvc repro` with up to JOBS independent stages at once (common/launch/pipeline.py); TARGETS: some stages only.
JOBS ?= 2
TARGETS ?=
repro: $(STAMP) $(FASHION)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m common.launch repro --jobs $(JOBS) $(TARGETS)

clean-venv:
	rm -rf $(VENV)
