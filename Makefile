# pyvae: `make demo` (the main job) and `make test` set everything up on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
NVCC ?= nvcc
# The lent GPU machines: a python that already has a CUDA torch and triton, no network.
GPU_PYTHON ?= python3
STAMP := $(VENV)/.pyvae-installed
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')
CU_SOURCES := $(shell find csrc -name '*.cu')

.PHONY: setup test demo bench bench-quick cuda-check cuda-adapter-check wheel-check gpu-check clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

# An importable torch (e.g. a CUDA build) is kept; otherwise the local CPU wheel is installed.
$(STAMP): $(PY) $(BUILD_INPUTS)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "setup: keeping torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		$(PY) -m pip install "torch==$(TORCH_VERSION)"; \
	fi
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install triton
	$(PY) -m pip install numpy pybind11 ninja pytest pytest-benchmark setuptools wheel tqdm safetensors Pillow scikit-learn matplotlib
	$(PY) -m pip install --no-build-isolation -e .
	@touch $@

test: setup cuda-check cuda-adapter-check wheel-check
	$(PY) -m pytest tests

# Builds the wheel, installs it in a fresh venv outside the checkout, runs the CLI and one op.
wheel-check: setup
	.ci/wheel-check $(PY)

# The main job on bundled photographs: train a patch VAE, encode at stride 1, report, draw.
demo: setup
	$(PY) -m pyvae.cli demo --out demo-output

bench-quick: setup
	$(PY) benchmarks/run.py --quick

bench: setup
	$(PY) benchmarks/run.py --save benchmarks/results

# Compile-checks every .cu file for Ampere (sm_80) and Hopper (sm_90) with the local nvcc.
cuda-check:
	@if ! command -v $(NVCC) >/dev/null 2>&1; then echo "cuda-check: no nvcc found, skipped"; exit 0; fi; \
	for f in $(CU_SOURCES); do for arch in 80 90; do \
		echo "cuda-check: $$f sm_$$arch"; \
		$(NVCC) -std=c++17 -O3 -Icsrc -gencode arch=compute_$$arch,code=sm_$$arch -c $$f -o /dev/null || exit 1; \
	done; done

# Compile-checks the torch-to-CUDA adapters (csrc/ops/*.cpp under PYVAE_WITH_CUDA), which no
# CPU build compiles, against the installed torch's headers.
cuda-adapter-check: setup
	.ci/cuda-adapter-check $(PY)

# On a GPU machine with no network: build in place with CUDA, run every test on CUDA, benchmark.
gpu-check:
	$(GPU_PYTHON) -m pip install --no-build-isolation --no-deps --no-index -e .
	$(GPU_PYTHON) -m pytest tests
	$(GPU_PYTHON) benchmarks/run.py --save benchmarks/results

clean:
	rm -rf build *.egg-info pyvae/_C*.so .pytest_cache .benchmarks
