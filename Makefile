# One-command set-up: `make test` and `make demo` create the virtual
# environment, install the pinned dependencies and detectron2, build the
# extension, then run. Every step is skipped when its result is up to date.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
DEMO_OUT ?= output/demo
# Extra tools/demo.py arguments, e.g. DEMO_ARGS="--seed 0 1 2" or "--jobs 1".
DEMO_ARGS ?=
PYTEST_ARGS ?=

EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py
ENV_STAMP := $(VENV)/.dcnv2-env-stamp
EXT_STAMP := build/.dcnv2-ext-stamp

.PHONY: env ext test test-no-vector-clones demo bench cuda-compile gpu-check lint format clean

env: $(ENV_STAMP)

$(ENV_STAMP): requirements.txt requirements-export.txt tools/bootstrap_env.sh tools/install_detectron2.sh dcnv2_plugin/_missing_detectron2_ops.py
	VENV=$(VENV) bash tools/bootstrap_env.sh
	@touch $@

ext: $(EXT_STAMP)

$(EXT_STAMP): $(ENV_STAMP) $(EXT_SOURCES)
	@echo "==> building the dcnv2 extension (C++$(if $(FORCE_CUDA), + CUDA,))"
	$(PYTHON) setup.py -q build_ext --inplace
	@mkdir -p build && touch $@

test: ext
	$(PYTHON) -m pytest tests $(PYTEST_ARGS)

# The operator tests once more, on a build whose CPU sampling loops are
# compiled for the build's target only instead of once per x86-64 level
# (csrc/ops/cpu/vector_clones.h; elsewhere only the level the machine picks
# runs). It is built with a copy of the package into a scratch folder and the
# tests run from there, so that they import it; test_build.py checks that
# they did. CI runs it.
NO_CLONES_LIB = build/no-vector-clones/lib
test-no-vector-clones: $(ENV_STAMP)
	DCNV2_NO_VECTOR_CLONES=1 $(PYTHON) setup.py -q build_py --build-lib $(NO_CLONES_LIB) \
		build_ext --build-lib $(NO_CLONES_LIB) --build-temp build/no-vector-clones/tmp
	cd $(NO_CLONES_LIB) && DCNV2_EXPECT_VECTOR_CLONES=0 $(abspath $(PYTHON)) -m pytest \
		-c $(CURDIR)/pytest.ini --rootdir $(CURDIR) -o pythonpath= -p no:cacheprovider \
		$(CURDIR)/tests/test_build.py $(sort $(wildcard $(CURDIR)/tests/test_deform_*.py)) $(PYTEST_ARGS)

demo: ext
	$(PYTHON) tools/demo.py --output $(DEMO_OUT) $(DEMO_ARGS)

# The benchmark's peers (ONNX Runtime) are not dependencies of the plugin.
bench: ext
	$(PYTHON) -m pip install -q -r benchmarks/requirements.txt
	$(PYTHON) benchmarks/bench_ops.py

# Compile (not run) the CUDA kernels for one architecture, into a scratch
# build folder: CI has no GPU but must fail on CUDA code that does not build.
# CUDA_HOME defaults to the toolkit that nvcc belongs to (nvcc may be a
# wrapper script outside it).
NVCC_TOP = $(shell nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^\#\$$ TOP=//p' | head -n 1)
cuda-compile: $(ENV_STAMP)
	CUDA_HOME="$(or $(CUDA_HOME),$(abspath $(NVCC_TOP)))" FORCE_CUDA=1 \
		TORCH_CUDA_ARCH_LIST="$(or $(TORCH_CUDA_ARCH_LIST),9.0)" \
		$(PYTHON) setup.py -q build_ext --build-temp build/cuda-compile/tmp --build-lib build/cuda-compile/lib

# The checks that need a CUDA GPU: the CUDA tests (pytest -m cuda, CPU vs
# CUDA included), then a short CUDA benchmark; fails at once without a GPU.
gpu-check: $(ENV_STAMP)
	PYTHON=$(PYTHON) bash tools/gpu_check.sh

# Style (pyproject.toml, .clang-format): `make format` applies it, `make lint` checks it (CI does).
CXX_SOURCES = $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')
lint: $(ENV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: $(ENV_STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

clean:
	rm -rf build dcnv2_plugin/_C*.so
