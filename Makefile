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
# MMDetection for the adapter tests, without dependencies: mmengine and mmcv-lite require opencv-python, a
# second cv2 over opencv-python-headless. What they do need is in setup.py's test extra. mmcv-lite has no
# compiled ops, so building a detector needs full mmcv (docs/weights.md, MMDetection).
FRAMEWORK_PINS := mmengine==0.10.7 mmcv-lite==2.1.0 mmdet==3.3.0

.PHONY: demo test test-fast test-gpu install clean constraints

$(VENV)/.stamp-base: setup.py $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) $(TORCH_PINS)
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-base
	$(PIP_INSTALL) -e '.[test]'
	$(PIP_INSTALL) --no-deps $(FRAMEWORK_PINS)
	touch $@

install: $(VENV)/.stamp-base

demo: $(VENV)/.stamp-base
	$(PY) tools/demo.py --output output/demo

test: $(VENV)/.stamp-test
	$(PY) -m pytest -q tests

# The fast subset while iterating: everything but the end-to-end runs (docs/getting_started.md, Quickstart).
test-fast: $(VENV)/.stamp-test
	$(PY) -m pytest -q -m "not slow" tests

# The CUDA tests (tests/cuda) on a machine with a GPU: detections, AMP, DDP over NCCL, bitwise resume, mask
# pasting and the benchmark on the device. Without CUDA each is skipped with one line saying so.
test-gpu: $(VENV)/.stamp-test
	$(PY) -m pytest -q -m cuda tests

# Re-resolve every dependency within setup.py's ranges in a scratch venv and write the versions it got to
# constraints.txt; then run `make clean test` and commit the file if the suite passes.
constraints:
	rm -rf .venv-resolve
	$(PYTHON) -m venv .venv-resolve
	.venv-resolve/bin/python -m pip install -q --upgrade pip
	.venv-resolve/bin/python -m pip install -q $(TORCH_PINS)
	.venv-resolve/bin/python -m pip install -q -e '.[test]'
	.venv-resolve/bin/python -m pip install -q --no-deps $(FRAMEWORK_PINS)
	{ sed -n '/^#/p' $(CONSTRAINTS); \
	  .venv-resolve/bin/python -m pip freeze --all --exclude-editable | grep -v '^#' \
	    | grep -v -E '^(setuptools|wheel)=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-resolve

clean:
	rm -rf $(VENV) output .pytest_cache
