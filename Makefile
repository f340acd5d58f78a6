# Quickstart targets. Both create .venv on first use; a stamp file avoids reinstalling on every run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Every install goes through constraints.txt: the exact versions the suite was run with (docs/getting_started.md, Install).
CONSTRAINTS := constraints.txt
PIP := $(PY) -m pip
PIP_INSTALL := $(PIP) install -q -c $(CONSTRAINTS)
# torch/torchvision as the CUDA builds served from local disk here; constraints.txt pins the same releases.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast install clean constraints

$(VENV)/.stamp-base: setup.py $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) $(TORCH_PINS)
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-base
	$(PIP_INSTALL) -e '.[test]'
	touch $@

install: $(VENV)/.stamp-base

demo: $(VENV)/.stamp-base
	$(PY) tools/demo.py --output output/demo

test: $(VENV)/.stamp-test
	$(PY) -m pytest -q tests

# The fast subset while iterating: everything but the end-to-end runs (docs/getting_started.md, Quickstart).
test-fast: $(VENV)/.stamp-test
	$(PY) -m pytest -q -m "not slow" tests

# Re-resolve every dependency within setup.py's ranges in a scratch venv and write the versions it got to
# constraints.txt; then run `make clean test` and commit the file if the suite passes.
constraints:
	rm -rf .venv-resolve
	$(PYTHON) -m venv .venv-resolve
	.venv-resolve/bin/python -m pip install -q --upgrade pip
	.venv-resolve/bin/python -m pip install -q $(TORCH_PINS)
	.venv-resolve/bin/python -m pip install -q -e '.[test]'
	{ sed -n '/^#/p' $(CONSTRAINTS); \
	  .venv-resolve/bin/python -m pip freeze --all --exclude-editable | grep -v '^#' \
	    | grep -v -E '^(setuptools|wheel)=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-resolve

clean:
	rm -rf $(VENV) output .pytest_cache
