# Quickstart targets. Both create .venv on first use; a stamp file avoids reinstalling on every run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch/torchvision are pinned to the releases this project is tested with (served from local disk here).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean

$(VENV)/.stamp-base: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-base
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.stamp-base

demo: $(VENV)/.stamp-base
	$(PY) tools/demo.py --output output/demo

test: $(VENV)/.stamp-test
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) output .pytest_cache
