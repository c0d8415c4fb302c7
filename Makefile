# Every target works from a fresh clone: the first run creates .venv/ and installs into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CPU build of torch (on these machines it lies on the local disk); override for CUDA machines,
# e.g. `make TORCH_SPEC="torch" install`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-dev demo test lint fuzz clean gpu-check gpu-check-prepare cross-check

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.core
install-dev: $(VENV)/.dev

demo: $(VENV)/.core
	$(VENV)/bin/bestformer train

test: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -n 2 --dist loadfile -q

# The fuzzers of the suite (checkpoints, sidecars, resume files, .bst files, data parsers, CLI options, hostile
# model options) with many more, randomized examples than CI runs: FUZZ_EXAMPLES per test (31 fuzz tests; 2000
# each, 62,000 inputs, take about a minute on 2 cores).
FUZZ_EXAMPLES ?= 2000
fuzz: $(VENV)/.dev
	BESTFORMER_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -n 2 -q -p no:cacheprovider -k fuzz \
		tests/test_reliability.py tests/test_deploy_fuzz.py tests/test_data_fuzz.py tests/test_hostile.py

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

# GPU readiness (docs/performance.md). Prepare here: the CIFAR-10 archive and the wheels the GPU image lacks go into
# git-ignored folders that the device call carries (.device-data, .whl); then run the check there.
gpu-check-prepare:
	mkdir -p .device-data .whl
	cp -f ../shared/data/cifar10/cifar10-train-jpeg.tar.gz .device-data/
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "nir>=1.0"

gpu-check:
	if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --target /tmp/bf-site .whl/*.whl; fi
	PYTHONPATH=/tmp/bf-site:src PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "$${OUT:-gpu-check}"

# The C library on other targets (docs/deploy.md): Debian's cross compilers and qemu (installed with apt-get when
# missing), then the zoo's MNIST bestformer_tiny built for a Cortex-M4 (flash, RAM) and for aarch64, run under qemu
# on MNIST test images (bit-exact against the packed runtime). Results: benchmarks/results/cross_check.json.
DATA ?= ../shared/data
CROSS_LIMIT ?= 1000
CROSS_TOOLS := gcc-arm-none-eabi libnewlib-arm-none-eabi binutils-arm-none-eabi gcc-aarch64-linux-gnu \
	libc6-dev-arm64-cross qemu-user
cross-check: $(VENV)/.core
	@if ! command -v arm-none-eabi-gcc >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null || \
	    ! command -v qemu-aarch64 >/dev/null; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(CROSS_TOOLS); \
	fi
	$(PY) benchmarks/cross_check.py --data-dir $(DATA)/mnist --limit $(CROSS_LIMIT)
