# Two commands do all set-up on a fresh machine:  `make train`  and  `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.fastlenet-built
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu csrc/*.cuh)
CLANG_FILES = $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu csrc/*.cuh tests/cuda_sim/*.cpp tests/cuda_sim/*.h)
TRAIN_ARGS ?=

.PHONY: venv deps build train test test-gpu test-gpu-offline lint format bench plot clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements.txt | $(PY)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install -r requirements.txt
	touch $@

deps: $(DEPS)

# The compiler command lines (nvcc's -gencode included) are shown; the full log is kept.
$(BUILT): $(DEPS) setup.py $(CSRC)
	$(PY) -m pip install -v --no-build-isolation --no-deps -e . > $(VENV)/build.log 2>&1; \
	status=$$?; grep -E "^ *\[[0-9]+/[0-9]+\]|error|fastlenet: " $(VENV)/build.log; \
	tail -n 2 $(VENV)/build.log; exit $$status
	touch $@

build: $(BUILT)

train: $(BUILT)
	$(PY) -m fastlenet train $(TRAIN_ARGS)

lint: $(DEPS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CLANG_FILES)

format: $(DEPS)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CLANG_FILES)

test: $(BUILT) lint
	$(PY) -m pytest tests

# Exits with an error where torch sees no CUDA device (the GPU targets' first step).
NEED_CUDA := -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"

# On a machine with a GPU, one command: the CUDA and Triton kernels on CUDA tensors (parity,
# gradcheck, opcheck, streams, half precision), then the benchmarks on the GPU.
test-gpu: $(BUILT)
	$(PY) $(NEED_CUDA)
	$(PY) -m pytest -m gpu tests
	$(MAKE) bench

# The same on a GPU machine without PyPI whose Python already holds torch, triton, pytest,
# pytest-benchmark and hypothesis (a lent machine's image): the extension is installed into
# that Python (editable, offline, built with every core) instead of a .venv with our pins.
SYSTEM_PY ?= python3
test-gpu-offline:
	mkdir -p build
	MAX_JOBS=$$(nproc) FASTLENET_CUDA=1 $(SYSTEM_PY) -m pip install --no-build-isolation \
	  --no-deps --no-index -e . > build/install-gpu.log 2>&1 || { tail -n 30 build/install-gpu.log; exit 1; }
	$(SYSTEM_PY) $(NEED_CUDA)
	$(SYSTEM_PY) -m pytest -m gpu tests
	$(MAKE) bench PY=$(SYSTEM_PY) BUILT=

# The C++ CPU kernels under ASan + UBSan, built apart in build/sanitize (see the script).
.PHONY: sanitize
sanitize: $(DEPS)
	tests/run_sanitized.sh $(PY)

# Benchmarks (benchmarks/harness.py has every setting): fastlenet against stock eager and
# torch.compile, providers timed alternately; prints the table, appends rows to
# benchmarks/results/*.csv, writes the PNGs and the tables there. ~13 min on this 2-core machine,
# 3 of them the shape sweep (issue 16: bench_*.py -k sweep, batch 64 and 256 only, its own
# case budget FASTLENET_BENCH_SWEEP_CASE_S; results/sweep_<device>.md and .png);
# quick run: FASTLENET_BENCH_BATCHES=64 make bench. The second pytest run times LeNet-5 again
# with glibc told to keep freed activation buffers; the table shows it as separate rows.
BENCH_MALLOC_ENV ?= MALLOC_TRIM_THRESHOLD_=268435456 MALLOC_MMAP_THRESHOLD_=33554432
bench: export FASTLENET_BENCH_RUN := $(shell date -u +%Y-%m-%dT%H:%M:%SZ)
bench: $(BUILT)
	$(PY) -m pytest benchmarks
	$(BENCH_MALLOC_ENV) $(PY) -m pytest benchmarks/bench_lenet5.py || [ $$? -eq 5 ]  # 5: none (GPU)
	$(PY) benchmarks/report.py --save
	$(PY) benchmarks/plot.py
	$(PY) benchmarks/gpu_static.py --save

plot: $(DEPS)
	$(PY) benchmarks/plot.py


clean:
	rm -rf build *.egg-info fastlenet/*.so $(BUILT)
