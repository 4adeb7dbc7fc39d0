# coopseg: two commands.
#   make test   create .venv, install torch (CPU) + triton + the package, run the tests
#   make bench  same setup, print the fused-vs-naive table (benchmarks/results/*.json)
# Other targets: bench-pytest (pytest-benchmark), bench-train (memory/time of one training step),
# toy (the toy lambda sweep, TOY_OUT=toy-out, TOY_ARGS=--full on a GPU),
# demo (offline real-anatomy demo: demo-data -> train -> evaluate, CPU minutes),
# gpu-compile (every Triton specialisation compiled for sm_80/sm_90 without a GPU),
# gpu-resources (their registers/spills/smem table), gpu-check (on a CUDA machine), clean.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: test bench bench-pytest bench-train toy demo gpu-compile gpu-resources gpu-check clean

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

clean:
	rm -rf build *.egg-info coopseg_kernels/*.so $(VENV) $(DEMO) gpu-results
