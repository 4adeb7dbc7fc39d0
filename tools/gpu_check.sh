#!/usr/bin/env bash
# make gpu-check: on a lent GPU machine, with its own python3 (torch with CUDA, triton, pytest,
# scipy), no venv, no network, no nibabel. The package is used from this tree (PYTHONPATH; the
# C++ extension is not needed). Runs the CUDA tests (only the files with cuda-marked tests, so
# nothing imports nibabel), the fused-vs-naive table, the copy bandwidth and each kernel's
# achieved bytes/s, the deterministic image gradient's cost against the atomic scatter, and the
# training step's memory. Every step runs even if an earlier one
# fails; outputs go to $GPU_OUT (their results lines to $GPU_OUT/results.jsonl) and are copied
# to $OUT when set; the exit status is the first failure's.
#   GPU_PY   python to use (default python3)
#   GPU_OUT  output folder, relative to the repository root (default gpu-results)
set -u
cd "$(dirname "$0")/.."
GPU_PY=${GPU_PY:-python3}
GPU_OUT=${GPU_OUT:-gpu-results}
mkdir -p "$GPU_OUT"
export PYTHONPATH="$PWD" TRITON_INTERPRET=0 PYTHONDONTWRITEBYTECODE=1

"$GPU_PY" -c 'import torch, triton; assert torch.cuda.is_available(), "no CUDA device"
print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)' \
    > "$GPU_OUT/device.txt" 2>&1 || { cat "$GPU_OUT/device.txt"; exit 1; }
cat "$GPU_OUT/device.txt"

status=0
run() {  # run NAME CMD...: CMD's output to $GPU_OUT/NAME and the terminal; keep the first failure
    local name=$1 rc
    shift
    echo "== $*"
    "$@" > "$GPU_OUT/$name" 2>&1
    rc=$?
    cat "$GPU_OUT/$name"
    if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
}

mapfile -t cuda_tests < <(grep -l "pytest.mark.cuda" tests/test_*.py)
run cuda-tests.txt "$GPU_PY" -m pytest -m cuda -q -rs -p no:cacheprovider "${cuda_tests[@]}"
run table.md "$GPU_PY" benchmarks/table.py --device cuda --out "$GPU_OUT"
run bandwidth.md "$GPU_PY" benchmarks/bandwidth.py --device cuda --out "$GPU_OUT"
run deterministic.md "$GPU_PY" benchmarks/deterministic.py --device cuda --out "$GPU_OUT"
run train-memory.md "$GPU_PY" benchmarks/train_memory.py --device cuda --breakdown 64 --out "$GPU_OUT"
if [ -n "${OUT:-}" ]; then cp -r "$GPU_OUT"/. "$OUT"/; fi
exit $status
