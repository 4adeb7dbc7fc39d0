"""The one place that validates op inputs. Every error names the argument and
what was expected, so a wrong call fails in Python before any kernel runs."""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

PADDING_MODES = ("zeros", "border")
WARP_PADDING_MODES = ("zeros", "border", "reflection")
WARP_MODES = ("bilinear", "nearest")
# image dtypes warped as they are by mode="nearest" (label maps)
LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)
BLUR_BOUNDARIES = ("zeros", "replicate", "reflect")
_MAX_SIZE = 2**31 - 1


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(n) for n in t.shape) + ")"


def not_meta(name: str, t: torch.Tensor) -> None:
    # a meta tensor has a shape but no data: every op here reads data, so say so up front
    if t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (shape only, no data); pass a cpu or cuda tensor")


def tensor(name: str, t, *, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype (float16/bfloat16/float32/float64), got {t.dtype}")


def image(name: str, t: torch.Tensor, min_size: int = 2, floating: bool = True) -> int:
    """A channel-first image batch (B, C, H, W) or (B, C, D, H, W); returns nd."""
    tensor(name, t, floating=floating)
    if t.dim() not in (4, 5):
        raise ValueError(f"{name} must be (B, C, H, W) or (B, C, D, H, W), got shape {_shape(t)}")
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{name} needs B >= 1 and C >= 1, got shape {_shape(t)}")
    spatial = t.shape[2:]
    if min(spatial) < min_size:
        raise ValueError(f"{name} spatial sizes must be >= {min_size}, got shape {_shape(t)}")
    if max(spatial) > _MAX_SIZE:
        raise ValueError(f"{name} spatial sizes must be < 2**31, got shape {_shape(t)}")
    return t.dim() - 2


def coarse_field(name: str, coarse: torch.Tensor, nd: int, batch: int | None = None) -> None:
    """A coarse displacement grid (B, nd, *s), every s_k >= 1."""
    tensor(name, coarse)
    expected = "(B, 2, h, w)" if nd == 2 else "(B, 3, d, h, w)"
    if coarse.dim() != nd + 2:
        raise ValueError(f"{name} must be {expected} for a {nd}-D image, got shape {_shape(coarse)}")
    if coarse.shape[1] != nd:
        raise ValueError(f"{name} must have {nd} channels (one displacement per spatial axis), "
                         f"got shape {_shape(coarse)}")
    if batch is not None and coarse.shape[0] != batch:
        raise ValueError(f"{name} batch size {coarse.shape[0]} does not match the image batch size {batch}")
    if coarse.shape[0] < 1 or min(coarse.shape[2:]) < 1:
        raise ValueError(f"{name} needs B >= 1 and coarse sizes >= 1, got shape {_shape(coarse)}")
    if max(coarse.shape[2:]) > _MAX_SIZE:
        raise ValueError(f"{name} sizes must be < 2**31, got shape {_shape(coarse)}")


def same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def choice(name: str, value, options: Sequence[str]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")


def _is_int(v) -> bool:
    """A whole number: an int (numpy/torch integer scalars included), never a bool."""
    if isinstance(v, bool) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool):
        return False
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.dtype.is_floating_point and not v.dtype.is_complex
    return isinstance(v, numbers.Integral)


def integer(name: str, value, *, minimum: int | None = None) -> int:
    """A Python/numpy int (not a bool, not a float) >= minimum."""
    if not _is_int(value):
        expected = "an int" if minimum is None else f"an int >= {minimum}"
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    v = int(value)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v}")
    return v


def real(name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
         high_open: bool = False) -> float:
    """A finite real number (not a bool) in [low, high] (open ends where asked)."""
    lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
    hi = "" if high is None else f"{high}" + (")" if high_open else "]")
    if low is not None and high is not None:
        expected = f"a finite number in {lo}, {hi}"
    elif low is not None:
        expected = f"a finite number {'>' if low_open else '>='} {low}"
    elif high is not None:
        expected = f"a finite number {'<' if high_open else '<='} {high}"
    else:
        expected = "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v) or (low is not None and (v <= low if low_open else v < low)) or \
            (high is not None and (v >= high if high_open else v > high)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return v


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def int_sequence(name: str, value, nd: int, *, minimum: int, what: str) -> tuple[int, ...]:
    """nd whole numbers >= minimum given as a sequence (list, tuple, 1-D tensor)."""
    if isinstance(value, (str, bytes, set, frozenset, dict)) or not hasattr(value, "__len__") or \
            getattr(value, "ndim", 1) != 1:  # unordered containers and 0-d / n-d arrays have no axis order
        raise TypeError(f"{name} must be a sequence of {nd} {what}, got {value!r}")
    items = value.tolist() if isinstance(value, torch.Tensor) else list(value)
    if len(items) != nd:
        raise ValueError(f"{name} must be {nd} {what} (one per spatial axis), got {value!r}")
    if not all(_is_int(v) for v in items):
        raise TypeError(f"{name} must be {nd} {what}, got {value!r}")
    out = tuple(int(v) for v in items)
    if min(out) < minimum or max(out) > _MAX_SIZE:
        raise ValueError(f"{name} must be {nd} {what}, got {value!r}")
    return out


def size(name: str, value, nd: int) -> tuple[int, ...]:
    return int_sequence(name, value, nd, minimum=2, what="ints, each >= 2")


def coarse_grid(name: str, value, nd: int) -> tuple[int, ...]:
    return int_sequence(name, value, nd, minimum=1, what="coarse sizes (ints >= 1)")


def translation_bound(name: str, value, size: Sequence[int]) -> tuple[int, ...]:
    """max_translation: None (any shift), one int >= 0 for every axis, or one per axis.
    Returned clipped to S_k - 1 (a larger shift leaves no overlap)."""
    nd = len(size)
    if value is None:
        return tuple(n - 1 for n in size)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d tensor or array: its scalar
        value = value.item()
    if _is_int(value):
        bound = (integer(name, value, minimum=0),) * nd
    else:
        if isinstance(value, bool) or isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be an int >= 0 or {nd} of them (voxels per axis), got {value!r}")
        try:
            bound = int_sequence(name, value, nd, minimum=0, what="ints >= 0 (voxels per axis)")
        except ValueError as exc:
            raise ValueError(f"{exc}; give one int >= 0 for every axis or {nd} of them") from None
    return tuple(min(b, n - 1) for b, n in zip(bound, size))


def warp_image_dtype(name: str, t: torch.Tensor, mode: str) -> None:
    """Floating images for every mode; integer and bool label maps (LABEL_DTYPES) for nearest."""
    if t.dtype.is_floating_point:
        return
    labels = "/".join(str(d).replace("torch.", "") for d in LABEL_DTYPES)
    if t.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name} must be floating, or a label map ({labels}) with mode='nearest', got {t.dtype}")
    if mode != "nearest":
        raise TypeError(f"{name} of dtype {t.dtype} (a label map) can only be warped with mode='nearest', "
                        f"got mode={mode!r}; cast it to a floating dtype for {mode!r}")


def warp_inputs(moving, coarse, padding_mode: str, align_corners: bool = True, mode: str = "bilinear") -> int:
    choice("mode", mode, WARP_MODES)
    if isinstance(moving, torch.Tensor):
        warp_image_dtype("moving", moving, mode)
    nd = image("moving", moving, floating=False)
    coarse_field("coarse", coarse, nd, batch=moving.shape[0])
    same_device(moving=moving, coarse=coarse)
    not_meta("moving", moving)
    choice("padding_mode", padding_mode, WARP_PADDING_MODES)
    flag("align_corners", align_corners)
    return nd


def kernel_dtype(name: str, t: torch.Tensor, backend: str, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = "/".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} dtype {t.dtype} is not supported by backend {backend!r} ({names}); "
                        "use backend='reference' or cast the input")


def blur_kernel(kernel) -> tuple[float, ...]:
    """An odd-length 1-D kernel of finite numbers with a nonzero sum."""
    if isinstance(kernel, (str, bytes)):
        raise TypeError(f"kernel must be a sequence of numbers such as (1, 2, 1), got the string {kernel!r}")
    if isinstance(kernel, torch.Tensor):
        if kernel.dim() != 1:
            raise ValueError(f"kernel must be 1-D, got shape {_shape(kernel)}")
        kernel = kernel.tolist()
    try:
        if any(isinstance(v, (bool, str, bytes)) for v in kernel):
            raise TypeError
        k = tuple(float(v) for v in kernel)
    except (TypeError, ValueError):
        raise TypeError(f"kernel must be a sequence of numbers, got {kernel!r}") from None
    if len(k) == 0 or len(k) % 2 == 0:
        raise ValueError(f"kernel must have an odd length (1, 3, 5, ...), got length {len(k)}")
    if not all(v == v and abs(v) != float("inf") for v in k):
        raise ValueError(f"kernel must be finite, got {k}")
    if sum(k) == 0:
        raise ValueError(f"kernel must not sum to 0 (it is normalised to sum 1), got {k}")
    return k


def blur_inputs(x, kernel, boundary: str) -> tuple[float, ...]:
    image("x", x, min_size=1)
    not_meta("x", x)
    choice("boundary", boundary, BLUR_BOUNDARIES)
    k = blur_kernel(kernel)
    r = len(k) // 2
    if boundary == "reflect" and min(x.shape[2:]) <= r:
        raise ValueError(f"boundary='reflect' needs every spatial size > kernel radius {r}, "
                         f"got x of shape {_shape(x)}")
    return k


def same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise ValueError(f"shapes must match, got {listed}")


def same_dtype(**tensors: torch.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n} {d}" for n, d in dtypes.items())
        raise TypeError(f"dtypes must match (cast one of them), got {listed}")


def similarity_inputs(s1, s2, coarse, align_corners: bool = True) -> int:
    nd = image("s1_blurred", s1)
    tensor("s2_blurred", s2)
    same_shape(s1_blurred=s1, s2_blurred=s2)
    same_dtype(s1_blurred=s1, s2_blurred=s2)
    coarse_field("coarse", coarse, nd, batch=s1.shape[0])
    same_device(s1_blurred=s1, s2_blurred=s2, coarse=coarse)
    not_meta("s1_blurred", s1)
    flag("align_corners", align_corners)
    return nd


def mask(name: str, t) -> None:
    """A mask batch: bool, uint8 or floating, (B, C, *S) with 2 or 3 spatial dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.dtype in (torch.bool, torch.uint8) or t.dtype.is_floating_point):
        raise TypeError(f"{name} must be bool, uint8 or floating, got {t.dtype}")
    if t.dim() not in (4, 5):
        raise ValueError(f"{name} must be (B, C, H, W) or (B, C, D, H, W), got shape {_shape(t)}")
    if min(t.shape[2:]) < 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{name} needs B, C >= 1 and spatial sizes >= 2, got shape {_shape(t)}")


def mask_pair(name1: str, t1, name2: str, t2) -> int:
    """Two mask batches of one shape (batch included) on one device; returns nd."""
    mask(name1, t1)
    mask(name2, t2)
    same_shape(**{name1: t1, name2: t2})
    same_device(**{name1: t1, name2: t2})
    not_meta(name1, t1)
    return t1.dim() - 2


def dense_warp_inputs(moving, ddf, padding_mode: str, mode: str) -> int:
    """A warp by a full-resolution displacement field (B, nd, *S) of the image's size: floating
    images for both modes, integer/bool label maps for mode="nearest"."""
    choice("mode", mode, ("bilinear", "nearest"))
    choice("padding_mode", padding_mode, ("zeros", "border", "reflection"))
    if not isinstance(moving, torch.Tensor):
        raise TypeError(f"moving must be a torch.Tensor, got {type(moving).__name__}")
    labels = (torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)
    if not moving.dtype.is_floating_point:
        if moving.dtype not in labels:
            raise TypeError(f"moving must be floating, or a label map (uint8/int16/int32/int64/bool) with "
                            f"mode='nearest', got {moving.dtype}")
        if mode != "nearest":
            raise TypeError(f"moving of dtype {moving.dtype} (a label map) can only be warped with mode='nearest', "
                            f"got mode={mode!r}; cast it to a floating dtype for {mode!r}")
    if moving.dim() not in (4, 5):
        raise ValueError(f"moving must be (B, C, H, W) or (B, C, D, H, W), got shape {_shape(moving)}")
    if moving.shape[0] < 1 or moving.shape[1] < 1 or min(moving.shape[2:]) < 2 or max(moving.shape[2:]) > _MAX_SIZE:
        raise ValueError(f"moving needs B, C >= 1 and spatial sizes in [2, 2**31), got shape {_shape(moving)}")
    nd = moving.dim() - 2
    coarse_field("ddf", ddf, nd, batch=moving.shape[0])
    if tuple(ddf.shape[2:]) != tuple(moving.shape[2:]):
        want = ", ".join(str(n) for n in (moving.shape[0], nd, *moving.shape[2:]))
        raise ValueError(f"ddf must have the spatial size of moving: expected shape ({want}), got {_shape(ddf)}")
    same_device(moving=moving, ddf=ddf)
    not_meta("moving", moving)
    return nd


UPSAMPLE_MODES = ("linear", "bspline")
BSPLINE_MIN_SIZE = 4  # control points per axis of a cubic B-spline grid (one interval and its margin)


def real_sequence(name: str, value, nd: int, *, positive: bool = False) -> tuple[float, ...]:
    """A finite real number (used for every axis) or a sequence (list, tuple, 1-D tensor/array) of nd
    of them; each > 0 where `positive`."""
    what = "finite numbers > 0" if positive else "finite numbers"
    expected = f"a finite number{' > 0' if positive else ''} or a sequence of {nd} {what} (one per spatial axis)"
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d tensor or array: its scalar
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        items = [value] * nd
    else:
        if isinstance(value, (str, bytes, set, frozenset, dict, bool)) or not hasattr(value, "__len__") or \
                getattr(value, "ndim", 1) != 1:
            raise TypeError(f"{name} must be {expected}, got {value!r}")
        items = value.tolist() if hasattr(value, "tolist") else list(value)
        if len(items) != nd:
            raise ValueError(f"{name} must be {expected}, got {len(items)} values: {value!r}")
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    out = tuple(float(v) for v in items)
    if not all(math.isfinite(v) for v in out) or (positive and min(out) <= 0):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return out


def upsample_args(upsample, coarse: torch.Tensor, nd: int, control_origin, control_spacing
                  ) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """upsample in UPSAMPLE_MODES; with "bspline" every coarse size >= 4 and the optional control-grid
    geometry (origin, spacing: a float or nd floats, spacing > 0) normalised to nd-tuples; with
    "linear" no geometry."""
    choice("upsample", upsample, UPSAMPLE_MODES)
    if upsample != "bspline":
        for name, v in (("control_origin", control_origin), ("control_spacing", control_spacing)):
            if v is not None:
                raise ValueError(f"{name} is only used with upsample='bspline', got {v!r} with upsample={upsample!r}")
        return None, None
    if min(coarse.shape[2:]) < BSPLINE_MIN_SIZE:
        raise ValueError(f"coarse must have >= {BSPLINE_MIN_SIZE} control points per axis with upsample='bspline' "
                         f"(one interval and a point beyond each end), got shape {_shape(coarse)}")
    origin = None if control_origin is None else real_sequence("control_origin", control_origin, nd)
    spacing = None if control_spacing is None else real_sequence("control_spacing", control_spacing, nd,
                                                                 positive=True)
    return origin, spacing


def deterministic_option(value) -> bool | None:
    """The warps' `deterministic` keyword as given: True, False, or None (PyTorch's switch, read
    at each call; the nn modules keep it so)."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"deterministic must be True, False or None, got {value!r} ({type(value).__name__})")
    return value


def deterministic(value) -> bool:
    """The warps' `deterministic` keyword resolved: None is PyTorch's switch
    (torch.are_deterministic_algorithms_enabled(), read now)."""
    value = deterministic_option(value)
    return torch.are_deterministic_algorithms_enabled() if value is None else value
