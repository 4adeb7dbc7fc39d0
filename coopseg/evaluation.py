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
any shift), fitted by ``coopseg_kernels.relative_similarity``. A paired Wilcoxon
signed-rank test compares ds_pred with ds_ann (n, median of ds_pred - ds_ann, two-sided
p). Written: the per-case CSV (one row per case and nothing else, so that any tool can
take its rows as the cases), the mean over cases beside it as ``.mean.csv`` (column
``summary``), the printed table as ``.txt``, and a figure (``.png``) of a few cases: one
slice of each image with the annotation (red) and prediction (green) contours, as the
paper's Fig. 4.

Score tables (``coopseg wilcoxon``, :func:`read_paired_scores`): one row per case. Rows
that summarise cases are refused (an id such as ``mean`` or ``std``), except the ``mean``
row that earlier versions of ``evaluate`` wrote last, which is recognised by its values
(the means of the rows above) and skipped with a note; duplicate case ids are refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

import coopseg_kernels as ck

from .data.tables import check_output_file, read_table, separator_hint, write_csv
from .data.volumes import VolumeError, load_pair, nifti_shape, read_manifest
from .errors import ConfigError, CoopsegError
from .infer import default_patch, load_checkpoint_model, parse_patch, predict_pair, t2_on_own_grid

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
    zero_differences: int = 0  # pairs with a == b: counted in n, dropped by the test


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Compare per-case scores a[i], b[i] of two methods with the Wilcoxon
    signed-rank test (scipy.stats.wilcoxon, two-sided; zero differences are
    dropped, as scipy's default 'wilcox' does, and counted in ``zero_differences``)."""
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
                      p_value=float(res.pvalue), zero_differences=int(np.sum(diff == 0)))


# ids of rows that summarise the cases of a score table instead of being one
SUMMARY_IDS = frozenset({"mean", "average", "avg", "median", "std", "sd", "stdev", "stddev", "var", "variance",
                         "sem", "se", "total", "sum", "min", "max", "all", "overall", "summary"})
ID_COLUMNS = ("case", "id")  # the id column of a score table when --id is not given


@dataclass
class PairedScores:
    """Two score columns of a table, one entry per case, with the notes of what was skipped."""
    a: list[float]
    b: list[float]
    ids: list[str]
    notes: list[str] = field(default_factory=list)


def _is_mean_of(values: Sequence[float], v: float) -> bool:
    """Whether v is the mean of values, to the 6 decimals that evaluate writes."""
    m = float(np.mean(values))
    return abs(v - m) <= 2e-6 + 1e-9 * abs(m)


def read_paired_scores(path, a: str, b: str, *, id_column: str | None = None) -> PairedScores:
    """Columns ``a`` and ``b`` of the score table ``path`` (a CSV with a header, one row per
    case) as numbers, for a paired test. The id column is ``id_column``, else ``case`` or
    ``id`` when present. Raises CoopsegError naming the file, line and column of an empty,
    non-numeric or non-finite cell; for a missing column, ``a == b``, duplicate case ids, a
    row whose id names a summary (``mean``, ``std``, ``total``, ...) and a summary table.
    The ``mean`` row that earlier versions of ``evaluate`` wrote last is skipped with a note
    when its values are the means of the rows above."""
    a, b = a.strip(), b.strip()
    id_column = None if id_column is None else id_column.strip()
    for name, col in (("a", a), ("b", b), ("id_column", id_column)):
        if col is not None and not col:
            raise CoopsegError(f"{name}: empty column name")
    if a == b:
        raise CoopsegError(f"the two score columns are the same ({a!r}): a paired test needs two columns")
    table = read_table(path, "score table")
    where = table.path
    if "summary" in table.header:
        raise CoopsegError(f"{where}: a summary table (column 'summary'), not per-case scores; "
                           "give the per-case CSV")
    for col in (a, b) + ((id_column,) if id_column else ()):
        if col not in table.header:
            raise CoopsegError(f"{where}: no column {col!r} (columns: {', '.join(repr(h) for h in table.header)})"
                               + separator_hint(table.header))
    if id_column is None:
        id_column = next((c for c in ID_COLUMNS if c in table.header), None)
    ids = table.column(id_column) if id_column else [""] * len(table.rows)
    values = {}
    for col in (a, b):
        vals = []
        for k, text in enumerate(table.column(col)):
            if not text:
                raise CoopsegError(f"{table.where(k, col)}: empty cell; every case needs a score")
            try:
                v = float(text)
            except ValueError:
                raise CoopsegError(f"{table.where(k, col)}: {text!r} is not a number") from None
            if not math.isfinite(v):
                raise CoopsegError(f"{table.where(k, col)}: {text!r} is not a finite number")
            vals.append(v)
        values[col] = vals
    keep = list(range(len(table.rows)))
    notes = []
    last = len(table.rows) - 1
    if last >= 1 and all(_is_mean_of(values[c][:last], values[c][last]) for c in (a, b)):
        flat = all(len(set(values[c][:last])) == 1 for c in (a, b))
        if ids[last].lower() == "mean":
            keep.pop()
            notes.append(f"{table.where(last)} ({id_column} 'mean') holds the means of the rows above: "
                         "a summary row, not counted")
        elif not flat:
            notes.append(f"{table.where(last)} equals the mean of the rows above in both columns; "
                         "if it is a summary row, remove it")
    seen = {}
    for k in keep:
        i = ids[k]
        if i.lower() in SUMMARY_IDS:
            raise CoopsegError(f"{table.where(k, id_column)}: {i!r} names a summary row, not a case; "
                               "remove it (the test needs one row per case)")
        if i and i in seen:
            raise CoopsegError(f"{where}: case id {i!r} appears twice (lines {table.lines[seen[i]]} and "
                               f"{table.lines[k]}); each case may appear once")
        seen[i] = k
    return PairedScores(a=[values[a][k] for k in keep], b=[values[b][k] for k in keep],
                        ids=[ids[k] for k in keep], notes=notes)


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


def output_paths(out) -> dict:
    """The files ``evaluate`` writes for ``--out`` (the per-case CSV)."""
    out = Path(out)
    return {"per-case CSV": out, "mean CSV": out.with_suffix(".mean.csv"), "table": out.with_suffix(".txt"),
            "figure": out.with_suffix(".png")}


def check_outputs(out, *, inputs=(), name: str = "out") -> dict:
    """Before any work: every file ``evaluate`` writes can be written, none is another's
    name or an input of the run (the manifest, the checkpoint). CoopsegError otherwise."""
    paths = output_paths(out)
    seen = {}
    for what, p in paths.items():
        if p in seen:
            raise CoopsegError(f"{name} {out}: the {what} would be written over the {seen[p]} ({p}); "
                               "give --out a name ending in .csv")
        seen[p] = what
        check_output_file(p, what, name=name, inputs=inputs)
    return paths


def check_options(*, overlap, omega, grid_spacing, iters, figure_cases) -> None:
    """evaluate's numeric options, before any case (ConfigError naming the parameter)."""
    if not (isinstance(overlap, (int, float)) and 0 <= overlap < 1):
        raise ConfigError(f"overlap must be a number in [0, 1), got {overlap!r}")
    if omega not in (None, "elastic", "translation"):
        raise ConfigError(f"omega must be 'elastic' or 'translation', got {omega!r}")
    if not (isinstance(grid_spacing, (int, float)) and math.isfinite(grid_spacing) and grid_spacing > 0):
        raise ConfigError(f"grid_spacing must be a finite number > 0, got {grid_spacing!r}")
    for key, v in (("iters", iters), ("figure_cases", figure_cases)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{key} must be an integer >= 0, got {v!r}")


def check_case_files(case, *, require_masks: bool = True) -> None:
    """Header checks of one case before any is computed: every file exists and is a 3-D
    NIfTI, each mask has its image's shape, and the T1 grid (where D_S is computed) has at
    least 2 voxels along every axis. VolumeError naming the file."""
    shapes = {}
    for attr, what in (("t1", "image"), ("t2", "image"), ("t1_mask", "mask"), ("t2_mask", "mask")):
        p = getattr(case, attr)
        if p is None:
            if require_masks:
                image = case.t1 if attr == "t1_mask" else case.t2
                raise VolumeError(f"{case.id}: no mask given for {image} (the manifest's {attr} is empty or missing)")
            continue
        shapes[attr] = nifti_shape(p, what)
    for m, i in (("t1_mask", "t1"), ("t2_mask", "t2")):
        if m in shapes and shapes[m] != shapes[i]:
            raise VolumeError(f"{getattr(case, m)}: mask shape {shapes[m]} does not match its image "
                              f"{getattr(case, i)} {shapes[i]}")
    if min(shapes["t1"]) < 2:
        raise VolumeError(f"{case.t1}: shape {shapes['t1']} is too small for D_S, which is computed on the "
                          "T1 grid: every axis needs at least 2 voxels")


def evaluate(manifest, checkpoint, out, *, patch=None, overlap: float = 0.5, device="cpu", omega=None,
             grid_spacing: float = 16.0, iters: int = 300, figure_cases: int = 3, progress: bool = True):
    """Evaluate every pair of ``manifest``; writes ``out`` (CSV, one row per case),
    ``out.mean.csv`` (the mean over cases), ``out.txt`` (table), ``out.png`` (figure).
    Returns (rows, wilcoxon result or None, table text).

    Everything that can be checked without computing is checked before the first case:
    the options, the output files, the manifest, every case's files (headers), the
    checkpoint and the window size."""
    check_options(overlap=overlap, omega=omega, grid_spacing=grid_spacing, iters=iters, figure_cases=figure_cases)
    paths = check_outputs(out, inputs=(manifest, checkpoint))
    cases = read_manifest(manifest)
    for case in cases:
        check_case_files(case, require_masks=True)
    net, config = load_checkpoint_model(checkpoint, device)
    omega = omega or getattr(config, "omega", "elastic")
    patch = parse_patch(patch if patch is not None else default_patch(config, net.spatial_dims), net.spatial_dims)
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
    write_csv(paths["per-case CSV"], ("case",) + METRICS,
              ([r["case"]] + [f"{r[k]:.6f}" for k in METRICS] for r in rows))
    write_csv(paths["mean CSV"], ("summary", "n") + METRICS,
              [["mean", len(rows)] + [f"{np.mean([r[k] for r in rows]):.6f}" for k in METRICS]])
    table = format_table(rows, test)
    paths["table"].write_text(table + "\n")
    if shown:
        figure(shown, paths["figure"])
    return rows, test, table
