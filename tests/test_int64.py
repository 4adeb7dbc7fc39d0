"""The 64-bit index path. COOPSEG_FORCE_INT64=1 (test-only) makes the C++
dispatch (dispatch_warp: warp, upsample, D_S step) and the Triton kernels
(INT64 specialisation of warp and blur) use 64-bit offsets on small inputs, so
the oracle tests run through that code; one opt-in test runs a real volume of
more than 2^31 voxels."""
import os
import time

import pytest
import torch

import coopseg_kernels as ck
import test_blur
import test_similarity
import test_warp
from coopseg_kernels import reference
from helpers import assert_matches_reference

# A translation: every voxel is one fixed blend of its 8 taps (no sums over cells), held ten
# times tighter than the shared fp32 bound.
TRANSLATION = 0.1


@pytest.fixture(autouse=True)
def force_int64(monkeypatch):
    monkeypatch.setenv("COOPSEG_FORCE_INT64", "1")


def test_switch_selects_int64_in_triton():
    pytest.importorskip("triton")
    from coopseg_kernels.triton.geometry import needs_int64

    assert needs_int64(10)
    os.environ.pop("COOPSEG_FORCE_INT64")
    assert not needs_int64(10) and needs_int64(2**31)


@pytest.mark.parametrize("padding_mode,align_corners,dtype", [("zeros", True, torch.float64),
                                                               ("border", False, torch.float32)])
@pytest.mark.parametrize("size,coarse_size", test_warp.CASES_3D[:2] + test_warp.CASES_2D[:2])
def test_warp_matches_reference_int64(backend, size, coarse_size, align_corners, padding_mode, dtype):
    test_warp.test_warp_matches_reference(backend, size, coarse_size, align_corners, padding_mode, dtype)


@pytest.mark.parametrize("size,coarse_size", test_warp.CASES_3D[:1] + test_warp.CASES_2D[:1])
def test_upsample_and_gradcheck_int64(backend, size, coarse_size):
    test_warp.test_upsample_field_matches_reference(backend, size, coarse_size, True)
    test_warp.test_gradcheck(backend, (3, 4, 5), (2, 1, 3), False, "border")


def test_empty_slabs_int64(set_threads):
    test_warp.test_cpp_empty_slabs_at_many_thread_counts((2, 64, 64), (6, 2, 2), True, "both", set_threads)


@pytest.mark.parametrize("size,coarse_size", [((5, 7, 6), (2, 3, 1)), ((9, 8), (3, 2))])
def test_similarity_int64(backend, size, coarse_size):
    test_similarity.test_similarity_step_matches_reference(backend, size, coarse_size, False)


@pytest.mark.parametrize("boundary", test_blur.BOUNDARIES)
@pytest.mark.parametrize("nd", [2, 3])
def test_blur_int64(backend, nd, boundary):
    test_blur.test_blur_matches_reference_and_scipy(backend, nd, boundary, test_blur.KERNELS[-1])


@pytest.mark.slow
def test_real_volume_over_2_31_voxels(monkeypatch):
    # 1 channel fp32, 1024 * 1024 * 2049 = 2^31 + 2^20 voxels: input + output
    # 16 GiB. A translation, so the expected values of any crop follow from the
    # reference on that crop; the last planes lie beyond offset 2^31.
    monkeypatch.delenv("COOPSEG_FORCE_INT64")
    if not ck.HAS_CPP:
        pytest.skip("C++ extension not built")
    D, H, W = 1024, 1024, 2049
    assert D * H * W > 2**31
    t0 = time.time()
    moving = torch.empty(1, 1, D, H, W)
    for d in range(0, D, 64):  # fill in chunks (no full-size temporaries)
        moving[0, 0, d:d + 64].copy_(torch.rand(min(64, D - d), H, W))
    coarse = torch.tensor([0.25, -0.5, 0.75]).view(1, 3, 1, 1, 1)
    out = ck.warp(moving, coarse, backend="cpp")
    elapsed = time.time() - t0
    for d0, h0, w0 in [(0, 0, 0), (D - 6, H - 7, W - 9), (D // 2, 3, W - 20)]:
        crop = moving[:, :, d0:d0 + 6, h0:h0 + 7, w0:w0 + 9]
        want = reference.warp(crop, coarse)
        # interior of the crop: every tap inside the crop
        assert_matches_reference(out[:, :, d0:d0 + 5, h0 + 1:h0 + 6, w0:w0 + 8][..., :-1, :, :],
                                 want[:, :, :5, 1:6, :8][..., :-1, :, :], factor=TRANSLATION)
    print(f"\n>2^31-voxel forward ({D}x{H}x{W} fp32): setup + warp {elapsed:.1f} s")
