# The README's commands. `make test` and `make bench` create .venv (torch and the test and
# benchmark dependencies), build the extension when a source changed, then run.
# `make gpu-check` runs on the GPU machine with its own python3 (no network there).
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
PY := $(VENV)/bin/python
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/* csrc/cuda/* csrc/persistent/*)

.PHONY: test bench build gpu-check clean

test: $(VENV)/.built
	$(PY) -m pytest -q tests

bench: $(VENV)/.built
	$(PY) -m bench $(ARGS)

build: $(VENV)/.built

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)" numpy numba pytest hypothesis build expecttest ninja setuptools wheel matplotlib tqdm
	touch $@

$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build rnnfused/*.so rnnfused/_build_info.py *.egg-info dist
