#!/usr/bin/env bash
# make sanitize: the C++ extension under AddressSanitizer + UBSan (-fno-wrapv), built in a
# separate copy (build-asan/; the in-place build is untouched), then the C++ tests and the long
# seeded fuzz (tests/test_fuzz.py: threads 1/2/3/6/16, NaN/inf inputs) with libasan preloaded
# into python. Fails on any sanitizer report (halt_on_error) or mismatch with the reference.
#   VPY  python to use (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
ASAN_DIR=build-asan
VPY=${VPY:-.venv/bin/python}
case $VPY in /*) ;; *) VPY=$PWD/$VPY ;; esac  # absolute, symlinks kept (a venv's python is one)

mkdir -p "$ASAN_DIR"
rm -rf "$ASAN_DIR/csrc" "$ASAN_DIR/coopseg_kernels"
cp -rp setup.py csrc coopseg_kernels "$ASAN_DIR"/
rm -f "$ASAN_DIR"/coopseg_kernels/*.so
cd "$ASAN_DIR"
COOPSEG_SANITIZE=1 "$VPY" setup.py -q build_ext --inplace

# from build-asan/, so that its coopseg_kernels (with the sanitized _C) is the one imported
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
    ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 PYTHONMALLOC=malloc \
    PYTHONPATH="$PWD" COOPSEG_BACKEND=cpp TRITON_INTERPRET=1
"$VPY" -c "import coopseg_kernels._C as c; assert '$ASAN_DIR' in c.__file__, c.__file__"
"$VPY" -m pytest -q -p no:cacheprovider ../tests/test_raw_ops.py \
    ../tests/test_warp.py ../tests/test_nonfinite.py ../tests/test_int64.py ../tests/test_blur.py \
    ../tests/test_similarity.py ../tests/test_warp_rows.py ../tests/test_warp_modes.py ../tests/test_nn.py \
    ../tests/test_warp_bspline.py ../tests/test_bspline_sitk.py \
    -k "not triton and not cuda"
COOPSEG_FUZZ_LONG=1 "$VPY" -m pytest -q -p no:cacheprovider ../tests/test_fuzz.py
