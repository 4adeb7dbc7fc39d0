# coopseg: two commands.
#   make test   create .venv, install torch (CPU) + triton + the package, run the tests
#   make bench  same setup, print the fused-vs-naive table (benchmarks/results/*.json)
# Other targets: bench-pytest (pytest-benchmark), bench-train (memory/time of one training step),
# toy (the toy lambda sweep, TOY_OUT=toy-out, TOY_ARGS=--full on a GPU), toy-shifts (its gain
# against the pairs' largest translation, 0-32 px, about 35 min here),
# demo (offline real-anatomy demo: demo-data -> train -> evaluate, CPU minutes),
# gpu-compile (every Triton specialisation compiled for sm_80/sm_90 without a GPU),
# gpu-resources (their registers/spills/smem table), gpu-check (on a CUDA machine),
# sanitize (ASan/UBSan build + C++ tests + long fuzz), warp-phases (per-phase CPU time of the warp), clean.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: test bench bench-pytest bench-train toy toy-shifts demo gpu-compile gpu-resources gpu-check sanitize warp-phases clean

$(VPY):
	$(PYTHON) -m venv $(VENV)

# torch first (the CPU wheel; an unpinned torch would pull a CUDA build), then
# the build tools, then the package with its test extras (install_requires brings
# the training layer's pyyaml, tqdm, matplotlib). Rebuilt when the C++ sources change.
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

# Peak memory and time of one joint training step over cubic crops, per
# configuration (naive ... fused + checkpointing + bf16); BENCH_TRAIN_ARGS e.g.
# "--width 1 --crops 16 32" (full width, slower) or "--device cuda".
BENCH_TRAIN_ARGS ?= --width 0.25 --breakdown 32
bench-train: $(STAMP)
	$(VPY) benchmarks/train_memory.py $(BENCH_TRAIN_ARGS)

# The toy experiment of the paper (section 3.1): reduced CPU sweep by default.
TOY_OUT ?= toy-out
TOY_ARGS ?=
toy: $(STAMP)
	$(VPY) -m coopseg toy --out $(TOY_OUT) $(TOY_ARGS)

# The reduced sweep at several largest translations (0 = the reduced default, 32 = the
# paper's): DIR/shift_<px>/ per shift, DIR/shifts.md and DIR/shifts.png side by side.
toy-shifts: $(STAMP)
	$(VPY) -m coopseg toy --out $(TOY_OUT)-shifts --max-shift 0 4 8 16 32 --lambda-r 0.1 0.3 1.0 $(TOY_ARGS)

# Every flag x dtype x arch specialisation of the Triton kernels (and the covering
# set of integer specialisations), compiled for sm_80 and sm_90 on this CPU-only
# machine; `make test` compiles the covering subset only (tests/test_gpu_compile.py).
gpu-compile: $(STAMP)
	$(VPY) benchmarks/gpu_resources.py --check --jobs $(or $(JOBS),2)

gpu-resources: $(STAMP)
	$(VPY) benchmarks/gpu_resources.py --dtypes fp32 --jobs $(or $(JOBS),2)

# On a lent GPU machine: its own python3 (torch with CUDA, triton, pytest, scipy), no
# venv, no network, no nibabel. The package is used from this tree (PYTHONPATH; the C++
# extension is not needed). Runs the CUDA tests (files with `cuda`-marked tests only, so
# nothing imports nibabel), the fused-vs-naive table, the copy bandwidth and each
# kernel's achieved bytes/s; every step runs even if an earlier one fails, results go
# to $(GPU_OUT) and are copied to $$OUT when set; the exit status is the first failure.
GPU_PY     ?= python3
GPU_OUT    ?= gpu-results
CUDA_TESTS  = $(shell grep -l "pytest.mark.cuda" tests/test_*.py)
export GPU_DEVICE_CHECK = import torch, triton; assert torch.cuda.is_available(), "no CUDA device"; \
print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
gpu-check:
	@mkdir -p $(GPU_OUT); status=0; \
	export PYTHONPATH="$(CURDIR)" TRITON_INTERPRET=0 PYTHONDONTWRITEBYTECODE=1; \
	$(GPU_PY) -c "$$GPU_DEVICE_CHECK" > $(GPU_OUT)/device.txt 2>&1 || { cat $(GPU_OUT)/device.txt; exit 1; }; \
	cat $(GPU_OUT)/device.txt; \
	run() { name=$$1; shift; echo "== $$*"; "$$@" > $(GPU_OUT)/$$name 2>&1; rc=$$?; cat $(GPU_OUT)/$$name; \
	  if [ $$rc -ne 0 ] && [ $$status -eq 0 ]; then status=$$rc; fi; }; \
	run cuda-tests.txt $(GPU_PY) -m pytest -m cuda -q -rs -p no:cacheprovider $(CUDA_TESTS); \
	run table.md $(GPU_PY) benchmarks/table.py --device cuda --out $(GPU_OUT); \
	run bandwidth.md $(GPU_PY) benchmarks/bandwidth.py --device cuda --out $(GPU_OUT); \
	run train-memory.md $(GPU_PY) benchmarks/train_memory.py --device cuda --breakdown 64; \
	if [ -n "$${OUT:-}" ]; then cp -r $(GPU_OUT)/. "$$OUT"/; fi; \
	exit $$status

# Offline demo on real anatomy (CPU, minutes): pairs from the MNI152 templates in the
# nilearn wheel -> a short 3-D training run -> the paper's evaluation table and figure.
DEMO := demo_out
demo: $(STAMP)
	$(VPY) -c "import nilearn" 2>/dev/null || $(VPY) -m pip install -q nilearn
	rm -rf $(DEMO)
	$(VPY) -m coopseg.cli demo-data $(DEMO)/data
	$(VPY) -m coopseg.cli train --config configs/demo.yaml --out $(DEMO)/run
	$(VPY) -m coopseg.cli evaluate --manifest $(DEMO)/data/test.csv --checkpoint $(DEMO)/run/last.pt \
	    --out $(DEMO)/results.csv --patch 64

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
		../tests/test_similarity.py ../tests/test_warp_rows.py -k "not triton and not cuda"
	cd $(ASAN_DIR) && $(SAN_ENV) COOPSEG_FUZZ_LONG=1 $(abspath $(VPY)) -m pytest -q -p no:cacheprovider ../tests/test_fuzz.py

clean:
	rm -rf build $(ASAN_DIR) *.egg-info coopseg_kernels/*.so $(VENV) $(DEMO) gpu-results

# Where the CPU warp's time goes: per-phase table of the forward and backward on one
# thread (benchmarks/warp_phases.cpp). MARCH=x86-64-v3 (AVX2 only) or MARCH=none
# (the compiler default, as COOPSEG_NATIVE=0) time the other builds.
MARCH ?= native
warp-phases: $(STAMP)
	$(VPY) benchmarks/warp_phases.py --march $(MARCH)
