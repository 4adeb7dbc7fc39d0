"""Plain helpers shared by the tests (fixtures and markers live in conftest.py).

- TOL / tol(): the one table of tolerances per dtype that every op test compares with.
  A test that genuinely needs another bound takes it from the table with a named factor
  and says why where it does.
- assert_matches_reference(): a result (and optionally its gradients) against the reference.
- peak_bytes: the peak-memory counter of the benchmarks (benchmarks/memory.py).
- The brute-force oracles (coopseg_kernels/similarity/naive.py): see the section at the end.

Import it as `from helpers import ...`: pytest's default ("prepend") import mode puts the
folder of a test file without __init__.py on sys.path, both for `pytest tests` and for
`pytest ../tests/test_warp.py` run from build-asan/ (make sanitize).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `make sanitize` runs from build-asan/, whose path has no benchmarks/
    sys.path.append(str(ROOT))  # appended: build-asan/'s coopseg_kernels keeps precedence

from benchmarks.memory import peak_bytes  # noqa: E402
from coopseg_kernels.similarity import naive  # noqa: E402

__all__ = ["TOL", "tol", "magnitude", "assert_matches_reference", "peak_bytes", "peak_cpu_bytes", "brute_force_shift",
           "naive"]

# |got - want| <= atol + rtol * |want|, element-wise, for a result of this dtype against the
# reference. float64 / float32: the C++ and (interpreted) Triton kernels on CPU against the
# plain-torch reference in the same dtype. float16 / bfloat16: the CUDA kernels against the
# reference run in fp32 on the same rounded inputs (the result is rounded to the half type).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def tol(dtype: torch.dtype, factor: float = 1.0) -> dict:
    """rtol / atol of TOL[dtype], both times factor (as keyword arguments of assert_close)."""
    return {k: v * factor for k, v in TOL[dtype].items()}


def magnitude(t: torch.Tensor, floor: float = 1e-12) -> float:
    """The largest |t| (at least floor): the scale of a comparison relative to the magnitude."""
    return max(float(t.detach().abs().max()), floor) if t.numel() else floor


def _as_list(t):
    return list(t) if isinstance(t, (list, tuple)) else [t]


def assert_matches_reference(got, want, *, dtype: torch.dtype | None = None, factor: float = 1.0,
                             scale: float | str | None = None, upcast: bool = False,
                             names: Sequence[str] | str | None = None, what: str = "",
                             wrt=None, grad_out: torch.Tensor | None = None) -> None:
    """Assert that got matches want within tol(dtype, factor).

    got, want: a tensor each, or equal-length sequences compared pairwise (e.g. (out,
        grad_moving, grad_coarse)); `names` labels them and `what` prefixes the failure message.
    dtype: the row of TOL; by default each got's own dtype.
    upcast: compare got.to(want.dtype) (a half result against a reference run in fp32);
        otherwise the dtypes must be equal, as in torch.testing.assert_close.
    scale: compare got / scale against want / scale; "max" is magnitude(want) (results that
        sum many terms, compared relative to their largest element).
    wrt=(got_inputs, want_inputs) with grad_out: also the gradients of got (a tensor) w.r.t.
        got_inputs against those of want w.r.t. want_inputs, with the same dtype, factor,
        scale and upcast; grad_out is cast to got's dtype, then that to want's dtype (so a
        half result and its fp32 reference see the same rounded output gradient).
    """
    gots, wants = _as_list(got), _as_list(want)
    labels = _as_list(names) if names is not None else [""] if len(gots) == 1 else [str(i) for i in range(len(gots))]
    assert len(gots) == len(wants) == len(labels), (len(gots), len(wants), len(labels))
    if wrt is not None:
        assert grad_out is not None and len(gots) == 1, "gradients need one output and grad_out"
        got_inputs, want_inputs = _as_list(wrt[0]), _as_list(wrt[1])
        labels = ["out"] if labels == [""] else labels
        g = grad_out.to(gots[0].dtype)
        gots = gots + list(torch.autograd.grad(gots[0], got_inputs, g))
        wants = wants + list(torch.autograd.grad(wants[0], want_inputs, g.to(wants[0].dtype)))
        labels = labels + [f"grad_{i}" for i in range(len(got_inputs))]
    for label, g, w in zip(labels, gots, wants):
        bounds = tol(dtype or g.dtype, factor)
        if upcast:
            g = g.to(w.dtype)
        if scale is not None:
            s = magnitude(w) if scale == "max" else scale
            g, w = g / s, w / s
        where = ": ".join(part for part in (what, label) if part)
        torch.testing.assert_close(g, w, **bounds, msg=(lambda m, where=where: f"{where}: {m}") if where else None)


# ----------------------------------------------------------------------------- brute-force oracles
# One copy, shared with the benchmarks: coopseg_kernels/similarity/naive.py.


def brute_force_shift(s1, s2, bound):
    """The translation oracle for one pair: (best Dice, best shift as a tuple), by scoring every
    integer shift within `bound` (naive.brute_force_translation; ties as translation_search)."""
    t, d = naive.brute_force_translation(s1, s2, bound)
    return d.item(), tuple(int(v) for v in t[0])


def peak_cpu_bytes(fn) -> int:
    """Peak new CPU storage while fn() runs (benchmarks/memory.py's counter)."""
    return peak_bytes(fn, torch.device("cpu"))
