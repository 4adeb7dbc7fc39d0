# coopseg: two commands.
#   make test   create .venv, install torch (CPU) + triton + the package, run the tests
#   make bench  same setup, print the fused-vs-naive table (appended to benchmarks/results.jsonl)
# Other targets: bench-pytest (pytest-benchmark), bench-train (memory/time of one training step),
# toy (the toy lambda sweep, TOY_OUT=toy-out, TOY_ARGS=--full on a GPU), toy-shifts (its gain
# against the pairs' largest translation, 0-32 px, about 35 min here), toy-oracle (the oracle gate
# at 32 px: the ceiling of the gain for a segmentor and budget; TOY_ARGS picks the segmentor),
# demo (offline real-anatomy demo: demo-data -> train -> evaluate, CPU minutes),
# gpu-compile (every Triton specialisation compiled for sm_80/sm_90 without a GPU),
# gpu-resources (their registers/spills/smem table), gpu-check (on a CUDA machine),
# sanitize (ASan/UBSan build + C++ tests + long fuzz), warp-phases (per-phase CPU time of the warp), clean.
# The longer programs are scripts in tools/; each says what it does at its top.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: lint test bench bench-pytest bench-train toy toy-shifts toy-oracle demo gpu-compile gpu-resources gpu-check sanitize \
        warp-phases clean

$(VPY):
	$(PYTHON) -m venv $(VENV)

# torch first (the CPU wheel; an unpinned torch would pull a CUDA build), then
# the build tools, then the package with its test extras (install_requires brings
# the training layer's pyyaml, tqdm, matplotlib). Rebuilt when the C++ sources change.
$(STAMP): $(VPY) $(SOURCES)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q setuptools wheel ninja numpy pybind11 triton ruff
	$(VPY) -m pip install -q --no-build-isolation -e ".[test]"
	$(VPY) -c "import coopseg_kernels as ck; assert ck.HAS_CPP, 'C++ extension failed to build'"
	touch $(STAMP)

# ruff (pyflakes, pycodestyle and isort rules; pyproject.toml) and the docs' links and anchors;
# .ci/run runs it before the tests.
lint: $(STAMP)
	$(VPY) -m ruff check . && $(VPY) tools/check_docs.py

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

# The oracle gate at the paper's 32 px (docs/toy.md#the-oracle-gate): the segmentor trained on
# s2* = s1 moved by the true shift; e.g. TOY_ARGS="--segmentor unet --width 0.5 --crop 240 --steps 3000 0 0".
toy-oracle: $(STAMP)
	$(VPY) -m coopseg toy --out $(TOY_OUT)-oracle --oracle --max-shift 32 $(TOY_ARGS)

# Every flag x dtype x arch specialisation of the Triton kernels (and the covering
# set of integer specialisations), compiled for sm_80 and sm_90 on this CPU-only
# machine; `make test` compiles the covering subset only (tests/test_gpu_compile.py).
gpu-compile: $(STAMP)
	$(VPY) tools/gpu_compile.py --check --jobs $(or $(JOBS),2)

gpu-resources: $(STAMP)
	$(VPY) tools/gpu_compile.py --dtypes fp32 --jobs $(or $(JOBS),2)

# On a lent GPU machine, with its own python3 and no venv (GPU_PY=, GPU_OUT=gpu-results):
# CUDA tests, table, bandwidth, training memory; results copied to $OUT when set.
gpu-check:
	bash tools/gpu_check.sh

# Offline demo on real anatomy (CPU, minutes): pairs from the MNI152 templates in the
# nilearn wheel -> a short 3-D training run -> the paper's evaluation table and figure.
DEMO := demo_out
demo: $(STAMP)
	VPY=$(VPY) DEMO=$(DEMO) bash tools/demo.sh

# The C++ extension under ASan + UBSan in build-asan/, then the C++ tests and the long fuzz.
SAN_DEPS ?= $(STAMP)
sanitize: $(SAN_DEPS)
	VPY=$(VPY) bash tools/sanitize.sh

clean:
	rm -rf build build-asan *.egg-info coopseg_kernels/*.so $(VENV) $(DEMO) gpu-results

# Where the CPU warp's time goes: per-phase table of the forward and backward on one
# thread (tools/warp_phases.cpp). MARCH=x86-64-v3 (AVX2 only) or MARCH=none
# (the compiler default, as COOPSEG_NATIVE=0) time the other builds.
MARCH ?= native
warp-phases: $(STAMP)
	$(VPY) tools/warp_phases.py --march $(MARCH)
