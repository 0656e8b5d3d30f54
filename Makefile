# The README's commands. `make test` and `make bench` create .venv (torch and the test and
# benchmark dependencies; about 3.1 GB to download with torch's CUDA libraries), build the
# extension when a source changed, then run. `make test-floor` runs the version-sensitive
# tests against the oldest supported torch (pyproject.toml), a CPU wheel, in .venv-floor,
# from a copy of the source archive so that the two builds never mix.
# `make gpu-check` runs on the GPU machine with its own python3 (no network there).
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
FLOOR_VENV ?= .venv-floor
FLOOR_TORCH_VERSION ?= 2.13.0
FLOOR_TESTS ?= tests/test_module_api.py tests/test_operators.py tests/test_autograd_modes.py tests/test_cells.py \
               tests/test_packed.py tests/test_convert.py tests/test_explain.py tests/test_docs.py
PY := $(VENV)/bin/python
TEST_DEPS := numpy numba pytest pytest-xdist hypothesis build expecttest ninja setuptools wheel
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/* csrc/cuda/* csrc/persistent/*)

.PHONY: test test-floor bench build gpu-check clean

# Two workers, a test at a time each (tests/conftest.py's scopes: the packaging tests, which share
# one wheel build, go to one worker together), in the suite's order. The packaging tests come
# first: one worker builds their wheel (minutes) while the other runs the rest.
PYTEST := -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder

test: $(VENV)/.built
	$(PY) $(PYTEST) tests

bench: $(VENV)/.built
	$(PY) -m bench $(ARGS)

build: $(VENV)/.built

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)" $(TEST_DEPS) onnx onnxscript onnxruntime matplotlib tqdm
	touch $@

$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

$(FLOOR_VENV)/.installed:
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet "torch==$(FLOOR_TORCH_VERSION)" $(TEST_DEPS)
	touch $@

# The floor checks torch's interfaces, not speed: its extension builds at -O1 and with the CPU
# vector code for the baseline instruction set only (which the main build's tests do not run on a
# CPU with AVX2 or AVX-512), in a fraction of the time of the main build.
test-floor: $(FLOOR_VENV)/.installed
	rm -rf build/floor
	RNNFUSED_SKIP_CUDA_BUILD=1 RNNFUSED_REQUIRE_CUDA_BUILD=0 \
	  $(FLOOR_VENV)/bin/python -m build --sdist --no-isolation --outdir build/floor . >/dev/null
	tar -xzf build/floor/rnnfused-*.tar.gz -C build/floor
	cd build/floor/rnnfused-*/ && RNNFUSED_SKIP_CUDA_BUILD=1 RNNFUSED_REQUIRE_CUDA_BUILD=0 RNNFUSED_CXX_OPT=1 \
	  RNNFUSED_CPU_BASELINE_ONLY=1 \
	  $(abspath $(FLOOR_VENV))/bin/python setup.py --quiet build_ext --inplace
	cd build/floor/rnnfused-*/ && $(abspath $(FLOOR_VENV))/bin/python $(PYTEST) $(FLOOR_TESTS)

gpu-check:
	bash scripts/gpu_check.sh

# Saved benchmark results (results/) are kept.
clean:
	rm -rf build rnnfused/*.so rnnfused/_build_info.py *.egg-info dist
