# coopseg: two commands.
#   make test   create .venv, install torch (CPU) + triton + the package, run the tests
#   make bench  same setup, print the fused-vs-naive table (benchmarks/results/*.json)
# Other targets: bench-pytest (pytest-benchmark), bench-train (memory/time of one training step),
# toy (the toy lambda sweep, TOY_OUT=toy-out, TOY_ARGS=--full on a GPU),
# demo (offline real-anatomy demo: demo-data -> train -> evaluate, CPU minutes), gpu-check (on a CUDA machine), clean.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: test bench bench-pytest bench-train toy gpu-check demo clean

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

# On a lent GPU machine: its own python3 (torch with CUDA, triton, pytest), no venv,
# no network. Runs the CUDA tests and the benchmarks; copies results to $OUT if set.
gpu-check:
	python3 -m pip install --no-deps --no-build-isolation -e .
	python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
	TRITON_INTERPRET=0 python3 -m pytest tests -m cuda -q -p no:cacheprovider
	python3 benchmarks/table.py --device cuda
	python3 benchmarks/train_memory.py --device cuda --breakdown 64
	python3 -m pytest benchmarks --benchmark-only -q -p no:cacheprovider --benchmark-json=benchmarks/results/pytest-benchmark-cuda.json
	if [ -n "$$OUT" ]; then cp benchmarks/results/*.json "$$OUT"/; fi

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
	rm -rf build *.egg-info coopseg_kernels/*.so $(VENV) $(DEMO)
