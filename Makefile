# Every target does its own set-up through `install`, which is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	# torch first: deepspeed's build needs it present (no build isolation).
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install --no-build-isolation -e .[dev]
	# DeepSpeedCPUAdam (--cpu-offload) is a C++ op DeepSpeed compiles on first use: build it here,
	# once, so that no launch waits on a compiler (or on a lock an interrupted build left behind).
	$(PY) -c "import torch; from deepspeed.ops.adam import DeepSpeedCPUAdam; DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])"
	touch $(STAMP)

demo: install
	$(PY) tools/demo.py

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
