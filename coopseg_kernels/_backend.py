"""The one place that picks an implementation: reference | cpp | triton.

Every public op calls `resolve(backend, device)` once and then `kernel(name, be)`
for the raw forward/backward functions, which have the same signature in both
compiled backends (torch.ops.coopseg.<name> and coopseg_kernels.triton.<name>).
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "cpp", "triton", "reference")

try:  # registers torch.ops.coopseg.* (the C++ CPU kernels)
    from . import _C  # noqa: F401

    HAS_CPP = True
    _CPP_ERROR = None
except ImportError as exc:  # not built: CPU falls back to the reference
    HAS_CPP = False
    _CPP_ERROR = exc

_warned_fallback = False


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _default_backend() -> str:
    env = os.environ.get("COOPSEG_BACKEND", "auto")
    if env not in BACKENDS:
        raise ValueError(f"environment variable COOPSEG_BACKEND must be one of {BACKENDS}, got {env!r}")
    return env


def resolve(backend: str, device: torch.device) -> str:
    """Map a user's backend choice to the implementation used for tensors on `device`."""
    global _warned_fallback
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = _default_backend()
    if backend == "auto":
        if device.type == "cuda":
            if _triton_available():
                return "triton"
            backend = "reference"
        elif device.type == "cpu" and HAS_CPP:
            return "cpp"
        else:
            backend = "reference"
        if not _warned_fallback:
            _warned_fallback = True
            why = f"the C++ extension is not built ({_CPP_ERROR})" if device.type == "cpu" else \
                f"no fused kernel for device {device.type!r}"
            warnings.warn(f"coopseg_kernels: {why}; using the reference implementation", RuntimeWarning,
                          stacklevel=3)
        return "reference"
    if backend == "cpp":
        if not HAS_CPP:
            raise RuntimeError(f"backend='cpp' needs the C++ extension, which failed to import: {_CPP_ERROR}. "
                               "Build it with `pip install --no-build-isolation -e .`")
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors only, got tensors on {device}")
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if device.type == "cpu" and not _triton_interpreted():
            raise ValueError("backend='triton' with CPU tensors runs only under the Triton interpreter: "
                             "set TRITON_INTERPRET=1 before triton is imported, or use backend='cpp'")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device}")
    return backend


def kernel(name: str, backend: str):
    """The raw (autograd-free) kernel `name` of a compiled backend."""
    if backend == "cpp":
        return getattr(torch.ops.coopseg, name)
    if backend == "triton":
        return getattr(importlib.import_module("coopseg_kernels.triton"), name)
    raise ValueError(f"no compiled kernel for backend {backend!r}")


def kernel_dtypes(backend: str) -> tuple[torch.dtype, ...]:
    if backend == "cpp":
        return (torch.float32, torch.float64)
    return (torch.float16, torch.bfloat16, torch.float32, torch.float64)
