"""`coopseg similarity` (Dice and D_S of two masks, or of the pairs of a list) and
`coopseg wilcoxon` (paired test of two score columns)."""
from __future__ import annotations

import contextlib
import csv
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import coopseg_kernels as ck

from ..data.tables import atomic_output, check_output_file, read_rows, resolve_path
from ..data.volumes import VolumeError, load_nifti
from ..errors import CoopsegError
from ..evaluation import paired_wilcoxon, read_paired_scores
from .common import CliError, nonneg_int, positive_float


def load_mask(path: str):
    """(mask tensor (1, 1, *S) bool, affine) of a 2-D or 3-D NIfTI file (read by
    `coopseg.data.volumes.load_nifti`; its errors become one-line CLI errors). D_S needs at
    least 2 voxels along every axis: a smaller mask is an error naming the file."""
    try:
        data, img = load_nifti(path, "mask", ndims=(2, 3))
    except (ImportError, VolumeError) as exc:
        raise CliError(str(exc)) from None
    if min(data.shape) < 2:
        raise CliError(f"{path}: mask shape {tuple(data.shape)} is too small for D_S: "
                       "every axis needs at least 2 voxels")
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


def _bound(text: str) -> list[int]:
    """--max-translation: N or N,N,N (voxels per axis)."""
    parse = nonneg_int("--max-translation")
    return [parse(v.strip()) for v in text.split(",")]


GRID_SPACING = positive_float("--grid-spacing", minimum=1.0,
                              minimum_why=" (voxels between coarse nodes: a finer grid has more nodes than voxels)")


def check_backend(backend: str) -> None:
    """Fail fast (before reading any mask) when this machine cannot run the backend."""
    try:
        ck.resolve_backend(backend, torch.device("cpu"))
    except (ValueError, RuntimeError) as exc:
        raise CliError(str(exc).splitlines()[0]) from None


def read_pairs(path: str) -> list[tuple[str, str]]:
    """The mask pairs of a `--pairs` CSV: columns `a` and `b` when its first row names them,
    else the first two columns of every row. Paths are relative to the CSV's folder. Before
    any pair is computed: every path must name a file, and no pair may appear twice."""
    rows = read_rows(path, "pairs list", error=CliError)
    header = [c.lower() for c in rows[0][1]]
    has_header = "a" in header and "b" in header
    if has_header:
        ia, ib = header.index("a"), header.index("b")
        rows = rows[1:]
        if not rows:
            raise CliError(f"{path}: pairs list has no rows (only a header)")
    else:
        ia, ib = 0, 1
    base = Path(path).parent
    pairs, seen = [], {}
    for line, r in rows:
        if len(r) <= max(ia, ib) or not r[ia] or not r[ib]:
            raise CliError(f"{path}, line {line}: needs two mask paths, got {r}")
        pa, pb = (resolve_path(r[i], base) for i in (ia, ib))
        for p in (pa, pb):
            if p.is_dir():
                raise CliError(f"{path}, line {line}: {p} is a folder, not a mask file")
            if not p.is_file():
                hint = " (a header row needs the columns a and b)" if not has_header and not pairs else ""
                raise CliError(f"{path}, line {line}: {p}: no such mask file{hint}")
        key = (os.path.realpath(pa), os.path.realpath(pb))
        if key in seen:
            raise CliError(f"{path}, line {line}: the same pair as line {seen[key]} ({pa}, {pb}); "
                           "each pair may appear once")
        seen[key] = line
        pairs.append((str(pa), str(pb)))
    return pairs


def cmd_similarity(args) -> int:
    for name, value in (("--pairs", args.pairs), ("--out", args.out)):
        if value is not None and not value.strip():  # `--out "$UNSET"`: not stdout, not the current folder
            raise CliError(f"{name}: empty path")
    check_backend(args.backend)
    if args.pairs:
        if args.a or args.b:
            raise CliError("give either two masks or --pairs, not both")
        if args.out:
            try:
                check_output_file(args.out, "results CSV", name="--out", inputs=(args.pairs,))
            except CoopsegError as exc:
                raise CliError(str(exc)) from None
        pairs = read_pairs(args.pairs)
        if args.out:
            try:
                check_output_file(args.out, "results CSV", name="--out", inputs=[p for pair in pairs for p in pair])
            except CoopsegError as exc:
                raise CliError(str(exc)) from None
        try:
            with (atomic_output(args.out) if args.out else contextlib.nullcontext(sys.stdout)) as out:
                writer = csv.writer(out)
                writer.writerow(["a", "b", "dice", "ds"])
                for pa, pb in tqdm(pairs, desc="D_S", unit="pair", file=sys.stderr, disable=False):
                    d, ds = compare(pa, pb, args)
                    writer.writerow([pa, pb, f"{d:.6f}", f"{ds:.6f}"])
                    out.flush()  # a reader of stdout sees each pair when it is done
        except BrokenPipeError:  # stdout's reader stopped reading (`| head`): stop quietly, as Python's docs do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        return 0
    if args.out:
        raise CliError("--out is for --pairs (two masks print their Dice and D_S)")
    if not (args.a and args.b):
        raise CliError("give two mask files (A B) or --pairs list.csv")
    d, ds = compare(args.a, args.b, args)
    print(f"Dice {d:.4f}")
    print(f"D_S  {ds:.4f}  (omega={args.omega})")
    return 0


def cmd_wilcoxon(args) -> int:
    for name, col in (("--a", args.a), ("--b", args.b), ("--id", args.id)):
        if col is not None and not col.strip():
            raise CliError(f"{name}: empty column name")
    try:
        scores = read_paired_scores(args.csv, args.a, args.b, id_column=args.id)
        res = paired_wilcoxon(scores.a, scores.b)
    except CoopsegError as exc:
        raise CliError(str(exc)) from None
    for note in scores.notes:
        print(f"coopseg: note: {note}", file=sys.stderr)
    zeros = f" ({res.zero_differences} zero difference{'s' * (res.zero_differences != 1)} dropped by the test)" \
        if res.zero_differences else ""
    print(f"n {res.n}{zeros}  median({args.a.strip()} - {args.b.strip()}) {res.median_difference:+.4f}  "
          f"W {res.statistic:.1f}  p {res.p_value:.4g}")
    return 0


def add_similarity_parser(sub) -> None:
    s = sub.add_parser("similarity", help="Dice and relative similarity D_S of two masks")
    s.add_argument("a", nargs="?", help="first mask (NIfTI); s1, the one that is deformed")
    s.add_argument("b", nargs="?", help="second mask (NIfTI)")
    s.add_argument("--pairs", help="CSV of mask pairs (columns a, b or the first two)")
    s.add_argument("--out", help="with --pairs: output CSV, written when every pair is done (default: stdout)")
    s.add_argument("--omega", choices=["elastic", "translation"], default="elastic")
    s.add_argument("--grid-spacing", type=GRID_SPACING, default=16.0,
                   help="elastic: coarse node spacing in voxels (>= 1)")
    s.add_argument("--max-translation", type=_bound, default=None, metavar="N[,N,N]",
                   help="bound of the exact integer shift search, voxels (one value or one per axis); "
                        "default 32 for translation, one node spacing for elastic")
    s.add_argument("--iters", type=nonneg_int("--iters"), default=100,
                   help="descent steps per level at most (coarsest level; finer levels get fewer)")
    s.add_argument("--step", type=positive_float("--step"), default=1.0,
                   help="alpha, dimensionless (see coopseg_kernels.similarity)")
    s.add_argument("--backend", default="auto", choices=["auto", "cpp", "triton", "reference"])
    s.set_defaults(fn=cmd_similarity)


def add_wilcoxon_parser(sub) -> None:
    w = sub.add_parser("wilcoxon", help="paired Wilcoxon signed-rank test of two score columns")
    w.add_argument("csv", help="CSV with a header, one row per case (as `coopseg evaluate` writes)")
    w.add_argument("--a", required=True, help="column of method A")
    w.add_argument("--b", required=True, help="column of method B")
    w.add_argument("--id", default=None,
                   help="column of the case ids, which must be unique (default: 'case' or 'id' when present)")
    w.set_defaults(fn=cmd_wilcoxon)


def add_parser(subparsers) -> None:
    add_similarity_parser(subparsers)
    add_wilcoxon_parser(subparsers)
