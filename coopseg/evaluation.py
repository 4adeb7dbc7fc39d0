"""Evaluations: the paper's §3.2.3 evaluation of a trained pair of networks on annotated
pairs (``coopseg evaluate --manifest test.csv --checkpoint C --out results.csv``), and the
paired statistics of per-case scores of two methods (``coopseg wilcoxon``).

Per case (each pair predicted as ``coopseg predict`` does: sliding window on the T1 grid):

  dice_t1          Dice(T1 prediction, T1 annotation), on the T1 grid
  dice_t2          Dice(T2 prediction, T2 annotation), on the T2 file's own grid (the
                   prediction resampled back, as ``predict`` writes it)
  ds_pred          D_S(T1 prediction, T2 prediction): relative similarity of the predicted pair
  ds_ann           D_S(T1 annotation, T2 annotation): the same for the annotated pair
  dice_warped      Dice(warp(T1 probability, registor field) > 0.5, T2 annotation)
  dice_annotations Dice(T1 annotation, T2 annotation): how misaligned the pair is

D_S and the last two compare T1- and T2-side masks on the T1 grid (the T2 annotation
resampled into it, linear then 0.5): D_S needs one grid. Ω is the checkpoint's (elastic:
``--grid-spacing`` voxels between coarse nodes, 16 = the registor's factor; translation:
any shift), fitted by ``coopseg_kernels.relative_similarity``. The mean row is the mean
over cases, and a paired Wilcoxon signed-rank test compares ds_pred with ds_ann (n,
median of ds_pred - ds_ann, two-sided p). Written: the CSV, the printed table beside it
as ``.txt``, and a figure (``.png``) of a few cases: one slice of each image with the
annotation (red) and prediction (green) contours, as the paper's Fig. 4.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

import coopseg_kernels as ck

from .data.volumes import load_pair, read_manifest
from .errors import CoopsegError
from .infer import default_patch, load_checkpoint_model, predict_pair, t2_on_own_grid

METRICS = ("dice_t1", "dice_t2", "ds_pred", "ds_ann", "dice_warped", "dice_annotations")
# the paper's §3.2.3 numbers (88 liver pairs, 12 for testing), for the printed table
PAPER = {"dice_annotations": 0.751, "ds_ann": 0.955, "ds_pred": 0.965, "dice_t1": 0.946, "dice_t2": 0.918,
         "dice_warped": 0.917, "p": 0.0029}


# ----------------------------------------------------------------------------- paired statistics

@dataclass
class PairedTest:
    n: int
    median_difference: float  # median of a - b
    statistic: float          # Wilcoxon signed-rank statistic
    p_value: float            # two-sided


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Compare per-case scores a[i], b[i] of two methods with the Wilcoxon
    signed-rank test (scipy.stats.wilcoxon, two-sided; zero differences are
    dropped, as scipy's default 'wilcox' does)."""
    from scipy import stats  # lazy on purpose: scipy is an optional dependency (the "io" extra)

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise CoopsegError(f"a and b must be 1-D score lists of one length, got shapes {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise CoopsegError("scores must be finite")
    diff = a - b
    if not np.any(diff != 0):
        raise CoopsegError("all paired differences are zero: the test is undefined")
    res = stats.wilcoxon(a, b)
    return PairedTest(n=int(a.size), median_difference=float(np.median(diff)), statistic=float(res.statistic),
                      p_value=float(res.pvalue))


# ----------------------------------------------------------------------------- the §3.2.3 evaluation

def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a))[None, None]


def dice(a, b) -> float:
    return float(ck.dice(_t(a), _t(b))[0])


def ds(a, b, *, omega: str, grid_spacing: float, iters: int) -> float:
    res = ck.relative_similarity(_t(a > 0.5), _t(b > 0.5), omega=omega, grid_spacing=grid_spacing, iters=iters)
    return float(res.score[0])


def case_metrics(pred, pair, *, omega: str = "elastic", grid_spacing: float = 16.0, iters: int = 300) -> dict:
    """The six numbers of one case from a Prediction and its loaded (annotated) Pair."""
    m1 = (pred.prob1 > 0.5).astype(np.float32)
    m2 = (pred.prob2 > 0.5).astype(np.float32)
    nd = pred.field.shape[0]
    if nd == 3:
        warped = ck.warp(_t(pred.prob1), torch.from_numpy(pred.field)[None])[0, 0].numpy()
    else:  # 2-D model: one field per slice along k
        p = torch.from_numpy(pred.prob1).permute(2, 0, 1)[:, None]
        f = torch.from_numpy(pred.field).permute(3, 0, 1, 2)
        warped = ck.warp(p.contiguous(), f.contiguous())[:, 0].permute(1, 2, 0).numpy()
    return {
        "dice_t1": dice(m1, pair.s1),
        "dice_t2": dice(t2_on_own_grid(pred.prob2, pair), pair.s2_native),
        "ds_pred": ds(m1, m2, omega=omega, grid_spacing=grid_spacing, iters=iters),
        "ds_ann": ds(pair.s1, pair.s2, omega=omega, grid_spacing=grid_spacing, iters=iters),
        "dice_warped": dice((warped > 0.5).astype(np.float32), pair.s2),
        "dice_annotations": dice(pair.s1, pair.s2),
    }


def wilcoxon(rows):
    """(n, median difference, p) of ds_pred vs ds_ann, or None when the test is undefined."""
    try:
        res = paired_wilcoxon([r["ds_pred"] for r in rows], [r["ds_ann"] for r in rows])
    except ValueError:
        return None
    return res


def format_table(rows, test) -> str:
    """The §3.2.3 numbers, mean over cases, next to the paper's."""
    mean = {k: float(np.mean([r[k] for r in rows])) for k in METRICS}
    lines = [f"{'§3.2.3 (mean over ' + str(len(rows)) + ' pairs)':<48}{'this run':>10}{'paper':>8}",
             f"{'misalignment: Dice between the annotations':<48}{mean['dice_annotations']:>10.3f}"
             f"{PAPER['dice_annotations']:>8.3f}",
             f"{'D_S of the annotated pairs':<48}{mean['ds_ann']:>10.3f}{PAPER['ds_ann']:>8.3f}",
             f"{'D_S of the predicted pairs':<48}{mean['ds_pred']:>10.3f}{PAPER['ds_pred']:>8.3f}"]
    if test is None:
        lines.append(f"{'Wilcoxon D_S predicted vs annotated':<48}{'undefined':>10}{'p=' + str(PAPER['p']):>8}")
    else:
        lines.append(f"{'Wilcoxon D_S predicted vs annotated: p':<48}{test.p_value:>10.3g}{PAPER['p']:>8.4f}")
        lines.append(f"{'  (n, median of predicted - annotated)':<48}{f'{test.n}, {test.median_difference:+.3f}':>10}")
    lines += [f"{'Dice T1 (prediction vs annotation)':<48}{mean['dice_t1']:>10.3f}{PAPER['dice_t1']:>8.3f}",
              f"{'Dice T2 (prediction vs annotation)':<48}{mean['dice_t2']:>10.3f}{PAPER['dice_t2']:>8.3f}",
              f"{'Dice warped T1 prediction vs T2 annotation':<48}{mean['dice_warped']:>10.3f}"
              f"{PAPER['dice_warped']:>8.3f}"]
    return "\n".join(lines)


def _contours(ax, mask, color):
    if mask.any() and not mask.all():
        ax.contour(mask.T.astype(float), levels=[0.5], colors=color, linewidths=1.0)


def figure(cases, path, *, n: int = 3) -> Path:
    """Slice with the largest T1 annotation of the first ``n`` cases: T1 (top) and T2 on the
    T1 grid (bottom); annotation red, prediction green."""
    import matplotlib  # lazy on purpose: matplotlib is only needed for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = cases[:n]
    fig, axes = plt.subplots(2, len(cases), figsize=(3.2 * len(cases), 6.4), squeeze=False)
    for c, (pair, pred) in enumerate(cases):
        k = int(np.argmax(pair.s1.sum(axis=(0, 1))))
        for r, (img, ann, prob, name) in enumerate(((pair.x1, pair.s1, pred.prob1, "T1"),
                                                    (pair.x2, pair.s2, pred.prob2, "T2"))):
            ax = axes[r, c]
            ax.imshow(img[..., k].T, cmap="gray", origin="lower", vmin=0, vmax=1)
            _contours(ax, ann[..., k] > 0.5, "red")
            _contours(ax, prob[..., k] > 0.5, "lime")
            ax.set_title(f"{pair.case.id} {name}, k={k}", fontsize=9)
            ax.axis("off")
    fig.suptitle("red: annotation, green: prediction", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def evaluate(manifest, checkpoint, out, *, patch=None, overlap: float = 0.5, device="cpu", omega=None,
             grid_spacing: float = 16.0, iters: int = 300, figure_cases: int = 3, progress: bool = True):
    """Evaluate every pair of ``manifest``; writes ``out`` (CSV), ``out.txt`` (table),
    ``out.png`` (figure). Returns (rows, wilcoxon result or None, table text)."""
    out = Path(out)
    cases = read_manifest(manifest)
    net, config = load_checkpoint_model(checkpoint, device)
    omega = omega or getattr(config, "omega", "elastic")
    patch = patch if patch is not None else default_patch(config, net.spatial_dims)
    rows, shown = [], []
    with tqdm(cases, desc="evaluate", unit="pair", disable=not progress) as bar:
        for case in bar:
            pair = load_pair(case, require_masks=True)
            pred = predict_pair(net, pair, patch=patch, overlap=overlap, device=device, progress=False)
            rows.append({"case": case.id, **case_metrics(pred, pair, omega=omega, grid_spacing=grid_spacing,
                                                         iters=iters)})
            if len(shown) < figure_cases:
                shown.append((pair, pred))
    test = wilcoxon(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=("case",) + METRICS)
        w.writeheader()
        for r in rows:
            w.writerow({"case": r["case"], **{k: f"{r[k]:.6f}" for k in METRICS}})
        w.writerow({"case": "mean", **{k: f"{np.mean([r[k] for r in rows]):.6f}" for k in METRICS}})
    table = format_table(rows, test)
    out.with_suffix(".txt").write_text(table + "\n")
    if shown:
        figure(shown, out.with_suffix(".png"))
    return rows, test, table

