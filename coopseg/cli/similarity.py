"""`coopseg similarity` (Dice and D_S of two masks, or of the pairs of a list) and
`coopseg wilcoxon` (paired test of two score columns)."""
from __future__ import annotations

import csv
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import coopseg_kernels as ck
from coopseg_kernels import _backend

from ..data.volumes import VolumeError, load_nifti
from ..evaluation import paired_wilcoxon
from .common import CliError


def load_mask(path: str):
    """(mask tensor (1, 1, *S) bool, affine) of a 2-D or 3-D NIfTI file (read by
    `coopseg.data.volumes.load_nifti`; its errors become one-line CLI errors)."""
    try:
        data, img = load_nifti(path, "mask", ndims=(2, 3))
    except (ImportError, VolumeError) as exc:
        raise CliError(str(exc)) from None
    return torch.from_numpy(data > 0.5)[None, None], img.affine


def compare(path_a: str, path_b: str, args) -> tuple[float, float]:
    a, aff_a = load_mask(path_a)
    b, aff_b = load_mask(path_b)
    if a.shape != b.shape:
        raise CliError(f"masks have different shapes: {path_a} {tuple(a.shape[2:])} vs {path_b} {tuple(b.shape[2:])}")
    if aff_a is not None and aff_b is not None and not np.allclose(aff_a, aff_b, atol=1e-4):
        warnings.warn(f"{path_a} and {path_b} have different affines; comparing voxel grids as they are",
                      stacklevel=2)
    bound = args.max_translation
    if bound is None and args.omega == "translation":
        bound = [32]  # the paper's toy Omega; elastic keeps the library's default (one node spacing)
    if bound is not None and len(bound) not in (1, a.dim() - 2):
        raise CliError(f"--max-translation must be one value or {a.dim() - 2} (one per axis), got {bound}")
    bound = bound[0] if bound is not None and len(bound) == 1 else bound
    try:
        res = ck.relative_similarity(a, b, omega=args.omega, grid_spacing=args.grid_spacing, max_translation=bound,
                                     iters=args.iters, step=args.step, backend=args.backend)
    except (ValueError, TypeError) as exc:  # user input the library rejects, naming the argument
        raise CliError(str(exc).splitlines()[0]) from None
    return float(ck.dice(a, b)[0]), float(res.score[0])


def _positive_float(name: str):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise CliError(f"{name} must be a number > 0, got {text!r}") from None
        if not (math.isfinite(v) and v > 0):
            raise CliError(f"{name} must be a finite number > 0, got {text!r}")
        return v
    return parse


def _nonneg_int(name: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise CliError(f"{name} must be an integer >= 0, got {text!r}") from None
        if v < 0:
            raise CliError(f"{name} must be an integer >= 0, got {text!r}")
        return v
    return parse


def _bound(text: str) -> list[int]:
    """--max-translation: N or N,N,N (voxels per axis)."""
    parse = _nonneg_int("--max-translation")
    return [parse(v.strip()) for v in text.split(",")]


def check_backend(backend: str) -> None:
    """Fail fast (before reading any mask) when this machine cannot run the backend."""
    try:
        _backend.resolve(backend, torch.device("cpu"))
    except (ValueError, RuntimeError) as exc:
        raise CliError(str(exc).splitlines()[0]) from None


def read_pairs(path: str) -> list[tuple[str, str]]:
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror}") from None
    if not rows:
        raise CliError(f"{path}: no pairs")
    header = [c.strip().lower() for c in rows[0]]
    if "a" in header and "b" in header:
        ia, ib = header.index("a"), header.index("b")
        rows = rows[1:]
    else:
        ia, ib = 0, 1
    pairs = []
    base = Path(path).parent
    for k, r in enumerate(rows, 1):
        if len(r) <= max(ia, ib):
            raise CliError(f"{path}: row {k} needs two mask paths, got {r}")
        pa, pb = (Path(r[i].strip()) for i in (ia, ib))
        pairs.append((str(pa if pa.is_absolute() else base / pa), str(pb if pb.is_absolute() else base / pb)))
    return pairs


def cmd_similarity(args) -> int:
    check_backend(args.backend)
    if args.pairs:
        if args.a or args.b:
            raise CliError("give either two masks or --pairs, not both")
        pairs = read_pairs(args.pairs)
        out = open(args.out, "w", newline="") if args.out else sys.stdout
        try:
            writer = csv.writer(out)
            writer.writerow(["a", "b", "dice", "ds"])
            for pa, pb in tqdm(pairs, desc="D_S", unit="pair", file=sys.stderr, disable=False):
                d, ds = compare(pa, pb, args)
                writer.writerow([pa, pb, f"{d:.6f}", f"{ds:.6f}"])
        finally:
            if args.out:
                out.close()
        return 0
    if not (args.a and args.b):
        raise CliError("give two mask files (A B) or --pairs list.csv")
    d, ds = compare(args.a, args.b, args)
    print(f"Dice {d:.4f}")
    print(f"D_S  {ds:.4f}  (omega={args.omega})")
    return 0


def cmd_wilcoxon(args) -> int:
    try:
        with open(args.csv, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise CliError(f"{args.csv}: {exc.strerror}") from None
    for col in (args.a, args.b):
        if not rows or col not in rows[0]:
            raise CliError(f"{args.csv}: no column {col!r}")
    try:
        a = [float(r[args.a]) for r in rows]
        b = [float(r[args.b]) for r in rows]
        res = paired_wilcoxon(a, b)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(f"n {res.n}  median({args.a} - {args.b}) {res.median_difference:+.4f}  "
          f"W {res.statistic:.1f}  p {res.p_value:.4g}")
    return 0


def add_similarity_parser(sub) -> None:
    s = sub.add_parser("similarity", help="Dice and relative similarity D_S of two masks")
    s.add_argument("a", nargs="?", help="first mask (NIfTI); s1, the one that is deformed")
    s.add_argument("b", nargs="?", help="second mask (NIfTI)")
    s.add_argument("--pairs", help="CSV of mask pairs (columns a, b or the first two)")
    s.add_argument("--out", help="with --pairs: output CSV (default: stdout)")
    s.add_argument("--omega", choices=["elastic", "translation"], default="elastic")
    s.add_argument("--grid-spacing", type=_positive_float("--grid-spacing"), default=16.0,
                   help="elastic: coarse node spacing in voxels (> 0)")
    s.add_argument("--max-translation", type=_bound, default=None, metavar="N[,N,N]",
                   help="bound of the exact integer shift search, voxels (one value or one per axis); "
                        "default 32 for translation, one node spacing for elastic")
    s.add_argument("--iters", type=_nonneg_int("--iters"), default=100,
                   help="descent steps per level at most (coarsest level; finer levels get fewer)")
    s.add_argument("--step", type=_positive_float("--step"), default=1.0,
                   help="alpha, dimensionless (see coopseg_kernels.similarity)")
    s.add_argument("--backend", default="auto", choices=["auto", "cpp", "triton", "reference"])
    s.set_defaults(fn=cmd_similarity)


def add_wilcoxon_parser(sub) -> None:
    w = sub.add_parser("wilcoxon", help="paired Wilcoxon signed-rank test of two score columns")
    w.add_argument("csv")
    w.add_argument("--a", required=True, help="column of method A")
    w.add_argument("--b", required=True, help="column of method B")
    w.set_defaults(fn=cmd_wilcoxon)


def add_parser(subparsers) -> None:
    add_similarity_parser(subparsers)
    add_wilcoxon_parser(subparsers)
