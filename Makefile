# Two commands do all the set-up on a fresh machine:
#   make demo   -- installs, then distils a student on the embedded synthetic dataset
#   make test   -- installs, then runs the whole test suite (what CI runs)
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# torch is installed only when it is missing; override for another CUDA/CPU build
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install demo test test-fast test-min bench static cuda-check clean

install:
	@$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PIP) install $(TORCH_PKGS)
	$(PIP) install -q "setuptools>=64" wheel ninja numpy pytest pytest-benchmark pillow matplotlib tqdm
	$(PIP) install -q --no-build-isolation -e .
	$(PYTHON) -m icakd_fast.info

demo: install
	$(PYTHON) -m icakd_fast.train

test: install
	$(PYTHON) -m pytest tests -q $(PYTEST_ARGS)

test-fast: install
	$(PYTHON) -m pytest tests -q -m "not slow" $(PYTEST_ARGS)

# the whole suite again on the oldest supported releases (torch 2.6 / Triton 3.2), in a venv of its own
test-min:
	bash .ci/min_versions.sh

bench: install
	$(PYTHON) -m pytest benchmarks -p no:cacheprovider --benchmark-enable --benchmark-only \
		--benchmark-columns=median,iqr,rounds --benchmark-sort=name \
		--benchmark-json=benchmarks/results/cpu-ops.json

# what the Triton CAM kernels compile to on an H100/H200 (sm_90), read without a GPU
static: install
	$(PYTHON) benchmarks/kernel_static.py

# compile-check the CUDA sources (no GPU needed; nvcc and CUDA_HOME must be set up)
cuda-check:
	bash .ci/build_ext.sh cuda-check

clean:
	rm -rf build dist *.egg-info icakd_fast/_C*.so icakd_fast/_build_info.json .pytest_cache .benchmarks
