"""blur: a separable blur as a torch.library custom op over the C++ / Triton kernels.

Each axis of the blur is a banded linear operator A_k (n x n): row j takes the
kernel taps j - r .. j + r, with the boundary mapping the taps that fall
outside (zeros: dropped; replicate: clamped; reflect: mirrored without the
edge, as F.pad). The blur is A_d A_h A_w; its adjoint (the backward) is
A_d^T A_h^T A_w^T, which for replicate/reflect is not the blur itself. Both are
the same kernel (`blur_apply`) run on different per-axis tables: for every
output index, up to 2r + 1 (input index, weight) pairs (index -1: unused).

coopseg::blur(x, kernel, boundary, backend)          A x
coopseg::blur_adjoint(y, kernel, boundary, backend)  A^T y
Each is the other's backward, so double backward works too.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor

from .. import _backend, _checks, reference


def _boundary_index(m: int, n: int, boundary: str) -> int | None:
    if 0 <= m < n:
        return m
    if boundary == "zeros":
        return None
    if boundary == "replicate":
        return min(max(m, 0), n - 1)
    # reflect (F.pad): -1 -> 1, n -> n - 2; needs n > r, checked by the caller
    return -m if m < 0 else 2 * (n - 1) - m


@functools.lru_cache(maxsize=512)
def _axis_rows(n: int, kernel: tuple[float, ...], boundary: str, adjoint: bool) -> tuple[tuple, tuple]:
    """(indices, weights) of the axis operator (or its transpose), n x (2r + 1)."""
    r = len(kernel) // 2
    rows: list[dict[int, float]] = [dict() for _ in range(n)]
    for j in range(n):
        for k, wk in enumerate(kernel):
            i = _boundary_index(j + k - r, n, boundary)
            if i is None:
                continue
            if adjoint:
                rows[i][j] = rows[i].get(j, 0.0) + wk
            else:
                rows[j][i] = rows[j].get(i, 0.0) + wk
    width = 2 * r + 1
    idx = [[-1] * width for _ in range(n)]
    wt = [[0.0] * width for _ in range(n)]
    for j, row in enumerate(rows):
        assert len(row) <= width
        for m, i in enumerate(sorted(row)):
            idx[j][m] = i
            wt[j][m] = row[i]
    return tuple(map(tuple, idx)), tuple(map(tuple, wt))


def axis_tables(size: Sequence[int], kernel: tuple[float, ...], boundary: str, adjoint: bool,
                dtype: torch.dtype, device: torch.device) -> tuple[list[Tensor], list[Tensor]]:
    """Per spatial axis, int32 indices and weights (n, 2r + 1) of the blur (or its adjoint)."""
    k = tuple(reference.normalized_kernel(kernel))
    idx, wt = [], []
    for n in size:
        i, w = _axis_rows(int(n), k, boundary, adjoint)
        idx.append(torch.tensor(i, dtype=torch.int32, device=device))
        wt.append(torch.tensor(w, dtype=dtype, device=device))
    return idx, wt


def _apply(x: Tensor, kernel: Sequence[float], boundary: str, backend: str, adjoint: bool) -> Tensor:
    idx, wt = axis_tables(x.shape[2:], tuple(kernel), boundary, adjoint, reference.math_dtype(x.dtype), x.device)
    return _backend.kernel("blur_apply", backend)(x, idx, wt)


@torch.library.custom_op("coopseg::blur", mutates_args=())
def _blur(x: Tensor, kernel: Sequence[float], boundary: str, backend: str) -> Tensor:
    return _apply(x, kernel, boundary, backend, adjoint=False)


@torch.library.custom_op("coopseg::blur_adjoint", mutates_args=())
def _blur_adjoint(y: Tensor, kernel: Sequence[float], boundary: str, backend: str) -> Tensor:
    return _apply(y, kernel, boundary, backend, adjoint=True)


@_blur.register_fake
def _(x, kernel, boundary, backend):
    return torch.empty_like(x)


@_blur_adjoint.register_fake
def _(y, kernel, boundary, backend):
    return torch.empty_like(y)


def _setup(ctx, inputs, output):
    _, kernel, boundary, backend = inputs
    ctx.args = (list(kernel), boundary, backend)


def _blur_grad(ctx, grad):
    return _blur_adjoint(grad.contiguous(), *ctx.args), None, None, None


def _blur_adjoint_grad(ctx, grad):
    return _blur(grad.contiguous(), *ctx.args), None, None, None


_blur.register_autograd(_blur_grad, setup_context=_setup)
_blur_adjoint.register_autograd(_blur_adjoint_grad, setup_context=_setup)


def _dispatch(t: Tensor, kernel, boundary: str, backend: str, adjoint: bool) -> Tensor:
    k = _checks.blur_inputs(t, kernel, boundary)
    be = _backend.resolve(backend, t.device)
    if be == "reference":
        spec = reference.blur_adjoint if adjoint else reference.blur
        return spec(t, kernel=k, boundary=boundary)
    _checks.kernel_dtype("x", t, be, _backend.kernel_dtypes(be))
    return (_blur_adjoint if adjoint else _blur)(t.contiguous(), list(k), boundary, be)


def blur(x: Tensor, *, kernel: Sequence[float] = (1.0, 2.0, 1.0), boundary: str = "zeros",
         backend: str = "auto") -> Tensor:
    """Blur `x` (B, C, *S) by correlating every spatial axis with `kernel`
    (odd length, normalised to sum 1) under `boundary` ("zeros", "replicate",
    "reflect" -- as F.pad). Differentiable; the backward is the exact adjoint."""
    return _dispatch(x, kernel, boundary, backend, adjoint=False)


def blur_adjoint(x: Tensor, *, kernel: Sequence[float] = (1.0, 2.0, 1.0), boundary: str = "zeros",
                 backend: str = "auto") -> Tensor:
    """The adjoint of `blur` (what its backward applies to a gradient)."""
    return _dispatch(x, kernel, boundary, backend, adjoint=True)
