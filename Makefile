# Two entry points: `make train` (set up, then the main job) and `make test` (set up, then the suite).
# Set-up is idempotent: the virtual environment is rebuilt only when pyproject.toml changes, and the
# editable install is redone only when the checkout moves.
PYTHON ?= python3
VENV ?= .venv
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
STAMP := $(VENV)/.balpoe-$(shell cat pyproject.toml | md5sum | cut -c1-12)-$(shell echo $(CURDIR) | md5sum | cut -c1-8)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup train test lint clean

setup: $(STAMP) $(FASHION_MNIST)

$(STAMP): pyproject.toml
	[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.balpoe-* && touch $@

$(FASHION_MNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

train: setup
	$(VENV)/bin/python scripts/describe_split.py

test: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
