# coopseg: two commands.
#   make test   create .venv, install torch (CPU) + triton + the package, run the tests
#   make bench  same setup, print the fused-vs-naive table (benchmarks/results/*.json)
# Other targets: bench-pytest (pytest-benchmark), gpu-check (on a CUDA machine), warp-phases
# (per-phase CPU time of the warp), clean.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: test bench bench-pytest gpu-check sanitize clean warp-phases

$(VPY):
	$(PYTHON) -m venv $(VENV)

# torch first (the CPU wheel; an unpinned torch would pull a CUDA build), then
# the build tools, then the package with its test extras. Rebuilt when the
# C++ sources change.
$(STAMP): $(VPY) $(SOURCES)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q setuptools wheel ninja numpy pybind11 triton
	$(VPY) -m pip install -q --no-build-isolation -e ".[test]"
	$(VPY) -c "import coopseg_kernels as ck; assert ck.HAS_CPP, 'C++ extension failed to build'"
	touch $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest tests

bench: $(STAMP)
	$(VPY) benchmarks/table.py

bench-pytest: $(STAMP)
	$(VPY) -m pytest benchmarks --benchmark-only --benchmark-columns=min,median,max

# On a lent GPU machine: its own python3 (torch with CUDA, triton, pytest), no venv,
# no network. Runs the CUDA tests and the benchmarks; copies results to $OUT if set.
gpu-check:
	python3 -m pip install --no-deps --no-build-isolation -e .
	python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
	TRITON_INTERPRET=0 python3 -m pytest tests -m cuda -q -p no:cacheprovider
	python3 benchmarks/table.py --device cuda
	python3 -m pytest benchmarks --benchmark-only -q -p no:cacheprovider --benchmark-json=benchmarks/results/pytest-benchmark-cuda.json
	if [ -n "$$OUT" ]; then cp benchmarks/results/*.json "$$OUT"/; fi

# The C++ extension under AddressSanitizer + UBSan (-fno-wrapv), built in a
# separate copy (build-asan/, the in-place build is untouched), then the C++
# tests and the long seeded fuzz (tests/test_fuzz.py, threads 1/2/3/6/16, NaN/inf
# inputs) with libasan preloaded into python. Fails on any sanitizer report
# (halt_on_error) or mismatch with the reference.
ASAN_DIR := build-asan
SAN_ENV := LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 PYTHONMALLOC=malloc \
	PYTHONPATH=$(CURDIR)/$(ASAN_DIR) COOPSEG_BACKEND=cpp TRITON_INTERPRET=1
SAN_DEPS ?= $(STAMP)
sanitize: $(SAN_DEPS)
	mkdir -p $(ASAN_DIR)
	rm -rf $(ASAN_DIR)/csrc $(ASAN_DIR)/coopseg_kernels
	cp -rp setup.py csrc coopseg_kernels $(ASAN_DIR)/
	rm -f $(ASAN_DIR)/coopseg_kernels/*.so
	cd $(ASAN_DIR) && COOPSEG_SANITIZE=1 $(abspath $(VPY)) setup.py -q build_ext --inplace
	# run from build-asan/ so that its coopseg_kernels (with the sanitized _C) is imported
	cd $(ASAN_DIR) && $(SAN_ENV) $(abspath $(VPY)) -c "import coopseg_kernels._C as c; assert '$(ASAN_DIR)' in c.__file__, c.__file__"
	cd $(ASAN_DIR) && $(SAN_ENV) $(abspath $(VPY)) -m pytest -q -p no:cacheprovider ../tests/test_raw_ops.py \
		../tests/test_warp.py ../tests/test_nonfinite.py ../tests/test_int64.py ../tests/test_blur.py \
		../tests/test_similarity.py -k "not triton and not cuda"
	cd $(ASAN_DIR) && $(SAN_ENV) COOPSEG_FUZZ_LONG=1 $(abspath $(VPY)) -m pytest -q -p no:cacheprovider ../tests/test_fuzz.py

clean:
	rm -rf build $(ASAN_DIR) *.egg-info coopseg_kernels/*.so $(VENV)

# Where the CPU warp's time goes: per-phase table of the forward and backward on one
# thread (benchmarks/warp_phases.cpp). MARCH=x86-64-v3 (AVX2 only) or MARCH=none
# (the compiler default, as COOPSEG_NATIVE=0) time the other builds.
MARCH ?= native
warp-phases: $(STAMP)
	$(VPY) benchmarks/warp_phases.py --march $(MARCH)
