"""Whole-volume prediction (``coopseg predict --t1 A --t2 B --checkpoint C --out DIR``).

The pair is loaded as for training (:mod:`coopseg.data.volumes`: T2 resampled into the
T1 grid, per-volume normalisation) and the network runs over the whole T1 grid with a
sliding window: windows of ``patch`` voxels (multiples of 16, the registor's factor)
overlap by ``overlap`` (0.5) and their outputs are blended with a Gaussian importance
map (sigma = patch / 8 per axis, as nnU-Net and MONAI's ``SlidingWindowInferer``
with ``mode="gaussian"``), so window borders, where the network sees the least
context, weigh least. A volume smaller than a window is zero-padded at its end. Blended
are the probabilities sigmoid(logits) and the registor's displacement field (the coarse
grid of each window upsampled to the window as ``coopseg_kernels.upsample_field``;
displacements are in voxels, the same in every window).

Written: ``DIR/t1_mask.nii.gz`` on the T1 grid, ``DIR/t2_mask.nii.gz`` on the T2 file's
*own* grid (the T2 probability resampled back from the T1 grid, linear then 0.5), each
with its input's affine and header (uint8, 1 = inside); with ``--field``,
``DIR/field.nii.gz``: the displacement field on the T1 grid, shape (I, J, K, 1, nd),
intent "vector", channel k = displacement along T1 array axis k in voxels, mapping the
T1 prediction onto the T2 one (``warp(p1, field)`` samples p1 at x + field(x)).
2-D models run slice by slice along the last array axis (k) and give nd = 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

import coopseg_kernels as ck

from .data.volumes import Case, Pair, load_pair, resample
from .errors import ConfigError, CoopsegError
from .train import load_model

MULTIPLE = 16  # the registor pools four times


@dataclass
class Prediction:
    """Blended outputs on the T1 grid: prob1, prob2 (I, J, K) float32 in [0, 1] and the
    displacement field (nd, I, J, K) in voxels."""
    prob1: np.ndarray
    prob2: np.ndarray
    field: np.ndarray


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Separable Gaussian centred on the window, sigma = sigma_scale * patch per axis,
    max 1; its smallest value is kept above 0 so every voxel of a window counts."""
    w = torch.ones(())
    for n in patch:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        g = torch.exp(-0.5 * (x / (sigma_scale * n)) ** 2)
        w = w[..., None] * g
    w = (w / w.max()).float()
    return w.clamp_min(max(float(w[w > 0].min()), 1e-3))


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Window starts along one axis: evenly spread, first at 0, last at size - patch,
    consecutive windows overlapping by at least ``overlap`` of the patch."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    n = math.ceil((size - patch) / step) + 1
    return sorted({int(round(i * (size - patch) / (n - 1))) for i in range(n)})


def parse_patch(text, spatial_dims: int) -> tuple[int, ...]:
    """'64' or '96,96,32' -> a tuple of multiples of 16 (ValueError otherwise)."""
    if isinstance(text, int):
        vals = [text]
    elif isinstance(text, str):
        try:
            vals = [int(v) for v in text.split(",")]
        except ValueError:
            raise ConfigError(f"patch must be an int or {spatial_dims} comma-separated ints, got {text!r}") from None
    else:
        vals = list(text)
    if len(vals) == 1:
        vals = vals * spatial_dims
    if len(vals) != spatial_dims or any(not isinstance(v, int) or v <= 0 or v % MULTIPLE for v in vals):
        raise ConfigError(f"patch must be {spatial_dims} positive multiples of {MULTIPLE}, got {text!r}")
    return tuple(vals)


def _round_up(n: int, m: int = MULTIPLE) -> int:
    return -(-n // m) * m


@torch.no_grad()
def sliding_window(net, x1: torch.Tensor, x2: torch.Tensor, patch: Sequence[int], *, overlap: float = 0.5,
                   device="cpu", progress: bool = True, desc: str = "predict"):
    """Run ``net`` over (B, 1, *S) images in overlapping windows; returns the blended
    (prob1, prob2, field): (B, 1, *S), (B, 1, *S), (B, nd, *S)."""
    if not 0 <= overlap < 1:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap!r}")
    nd = x1.dim() - 2
    size = tuple(x1.shape[2:])
    # windows no larger than the (16-rounded) volume; pad the volume up to the window
    patch = tuple(min(p, _round_up(s)) for p, s in zip(patch, size))
    padded = tuple(max(s, p) for s, p in zip(size, patch))
    pad = []
    for s, p in zip(reversed(size), reversed(padded)):
        pad += [0, p - s]
    x1p, x2p = torch.nn.functional.pad(x1, pad), torch.nn.functional.pad(x2, pad)
    B = x1.shape[0]
    acc_p = torch.zeros((B, 2) + padded)
    acc_f = torch.zeros((B, nd) + padded)
    acc_w = torch.zeros(padded)
    weight = gaussian_importance(patch)
    starts = [window_starts(s, p, overlap) for s, p in zip(padded, patch)]
    corners = list(np.ndindex(*[len(s) for s in starts]))
    for idx in tqdm(corners, desc=desc, unit="window", disable=not progress, leave=False):
        sl = tuple(slice(starts[a][i], starts[a][i] + patch[a]) for a, i in enumerate(idx))
        l1, l2, coarse = net(x1p[(...,) + sl].to(device), x2p[(...,) + sl].to(device))
        probs = torch.sigmoid(torch.cat((l1, l2), 1)).float().cpu()
        field = ck.upsample_field(coarse.float(), patch).cpu()
        acc_p[(...,) + sl] += probs * weight
        acc_f[(...,) + sl] += field * weight
        acc_w[sl] += weight
    crop = (...,) + tuple(slice(0, s) for s in size)
    acc_p, acc_f, acc_w = acc_p[crop], acc_f[crop], acc_w[crop]
    return acc_p[:, :1] / acc_w, acc_p[:, 1:] / acc_w, acc_f / acc_w


def predict_pair(net, pair: Pair, *, patch=64, overlap: float = 0.5, device="cpu", progress: bool = True) -> Prediction:
    """Blended probabilities and field of ``net`` on a loaded pair, on the T1 grid."""
    nd = net.spatial_dims
    patch = parse_patch(patch, nd)
    net.eval()
    x1 = torch.from_numpy(pair.x1)[None, None]
    x2 = torch.from_numpy(pair.x2)[None, None]
    if nd == 3:
        p1, p2, f = sliding_window(net, x1, x2, patch, overlap=overlap, device=device, progress=progress)
        pred = Prediction(p1[0, 0].numpy(), p2[0, 0].numpy(), f[0].numpy())
    else:  # 2-D: the slices along k become the batch
        s1, s2 = x1[0, 0].permute(2, 0, 1)[:, None], x2[0, 0].permute(2, 0, 1)[:, None]
        p1, p2, f = sliding_window(net, s1, s2, patch, overlap=overlap, device=device, progress=progress)
        pred = Prediction(p1[:, 0].permute(1, 2, 0).numpy(), p2[:, 0].permute(1, 2, 0).numpy(),
                          f.permute(1, 2, 3, 0).numpy())
    for name, value in (("T1 probabilities", pred.prob1), ("T2 probabilities", pred.prob2),
                        ("displacement field", pred.field)):
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        if bad:  # never a mask from NaN (NaN > 0.5 is False, sigmoid(NaN)...): refuse
            raise CoopsegError(f"{pair_name(pair)}: the network's {name} are not finite at {bad} of "
                                  f"{np.size(value)} voxels (a diverged checkpoint, or an input it overflows on); "
                                  f"no mask written")
    return pred


def pair_name(pair: Pair) -> str:
    """The pair as its files (for messages)."""
    case = getattr(pair, "case", None)
    if case is None:
        return "the pair"
    return f"{case.t1}, {case.t2}" if case.id == "predict" else f"case {case.id} ({case.t1}, {case.t2})"


def t2_on_own_grid(prob2: np.ndarray, pair: Pair) -> np.ndarray:
    """The T2 probability (on the T1 grid) resampled back onto the T2 file's grid, > 0.5."""
    return resample(prob2, pair.t1_img.affine, pair.t2_img.shape[:3], pair.t2_img.affine, mask=True)


def _like(img, data: np.ndarray, dtype):
    """A NIfTI image of ``data`` with ``img``'s affine and header (data type replaced)."""
    header = img.header.copy()
    header.set_data_dtype(dtype)
    return type(img)(data.astype(dtype), img.affine, header)  # nibabel resets the scaling


def write_prediction(pred: Prediction, pair: Pair, out_dir, *, field: bool = False) -> dict:
    """Write the masks (each on its own modality's grid) and optionally the field."""
    import nibabel as nib  # lazy on purpose: nibabel is an optional dependency (the "io" extra)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"t1_mask": out_dir / "t1_mask.nii.gz", "t2_mask": out_dir / "t2_mask.nii.gz"}
    t1 = (pred.prob1 > 0.5).astype(np.uint8)
    nib.save(_like(pair.t1_img, t1.reshape(pair.t1_img.shape), np.uint8), str(paths["t1_mask"]))
    t2 = t2_on_own_grid(pred.prob2, pair).astype(np.uint8)
    nib.save(_like(pair.t2_img, t2.reshape(pair.t2_img.shape), np.uint8), str(paths["t2_mask"]))
    if field:
        data = np.moveaxis(pred.field, 0, -1)[..., None, :].astype(np.float32)  # (I, J, K, 1, nd)
        img = nib.Nifti1Image(data, pair.t1_img.affine)
        img.header.set_intent("vector", (), name="displacement_vox")
        img.header.set_xyzt_units("mm")
        paths["field"] = out_dir / "field.nii.gz"
        nib.save(img, str(paths["field"]))
    return paths


def resolve_device(device) -> torch.device:
    """A torch device this machine has: cpu, cuda or cuda:N (ConfigError naming it otherwise)."""
    text = str(device) if str(device).strip() else repr(str(device))
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {text}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {text}: no CUDA device on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def load_checkpoint_model(checkpoint, device="cpu"):
    """(net, config) from a training checkpoint (coopseg.train.load_model), net in eval mode.
    The device is checked first; CheckpointError names the file when it does not load or
    holds non-finite weights."""
    device = resolve_device(device)
    net, config = load_model(Path(checkpoint), map_location=device)
    return net.to(device).eval(), config


def default_patch(config, spatial_dims: int):
    """The training crop's upper bound rounded up to 16 when the config has one, else 64."""
    crop = getattr(config, "crop_max", None)
    try:
        vals = [int(crop)] * spatial_dims if isinstance(crop, (int, float)) else [int(v) for v in crop]
        return tuple(max(MULTIPLE, _round_up(v)) for v in vals)
    except (TypeError, ValueError):
        return (64,) * spatial_dims


def predict_files(t1, t2, checkpoint, out, *, patch=None, overlap=0.5, device="cpu", field=False,
                  progress=True) -> dict:
    net, config = load_checkpoint_model(checkpoint, device)
    pair = load_pair(Case(id="predict", t1=Path(t1), t2=Path(t2)), require_masks=False)
    patch = patch if patch is not None else default_patch(config, net.spatial_dims)
    pred = predict_pair(net, pair, patch=patch, overlap=overlap, device=device, progress=progress)
    return write_prediction(pred, pair, out, field=field)
