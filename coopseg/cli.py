"""The `coopseg` command.

  coopseg similarity A.nii.gz B.nii.gz [--omega elastic|translation] [--grid-spacing 16]
                     [--max-translation 32 | 32,32,8] [--iters N] [--step A] [--backend auto]
  coopseg similarity --pairs list.csv [--out results.csv] [...]
  coopseg wilcoxon scores.csv --a COLUMN --b COLUMN
  coopseg train --config CFG.yaml --out DIR [--resume] | --write-config CFG.yaml
  coopseg toy --out DIR [--full] [--lambda-r V ...]   (the §3.1 lambda sweep, coopseg/toy.py)
  coopseg import-chaos DIR OUT | predict --t1 A --t2 B --checkpoint C --out DIR
  coopseg evaluate --manifest test.csv --checkpoint C --out results.csv | demo-data OUT

`similarity` reads two masks (NIfTI, through nibabel; voxels > 0.5 are inside),
prints Dice and the relative similarity D_S. With --pairs, each CSV row names
two mask files (columns a, b, or the first two); the results go to --out (or
stdout) as CSV with a tqdm progress bar on stderr. `wilcoxon` compares two
columns of per-case scores with the Wilcoxon signed-rank test.

User errors (bad option values, unreadable files, a backend this machine cannot
run) print one line `coopseg: error: ...` and exit with status 2. Other modules
add subcommands with an `add_parser(subparsers)` function registered in
`build_parser`.
"""
from __future__ import annotations

import argparse
import csv
import sys
import warnings
from pathlib import Path

import math

import numpy as np
import torch


class CliError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def out_dir(text: str, name: str = "--out") -> Path:
    """An output folder argument: it, or its nearest existing ancestor, must be a folder
    (a file there would fail deep inside mkdir with a traceback)."""
    path = Path(text)
    for q in (path, *path.parents):
        if q.exists():
            if not q.is_dir():
                raise CliError(f"{name}: {q} exists and is not a directory")
            break
    return path


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (unknown option, bad choice) as one line, like every other user error."""

    def error(self, message):
        raise CliError(message)


def load_mask(path: str):
    """(mask tensor (1, 1, *S) bool, affine) of a 2-D or 3-D NIfTI file (read by
    `coopseg.data.volumes.load_nifti`; its errors become one-line CLI errors)."""
    try:
        from coopseg.data.volumes import VolumeError, load_nifti
        data, img = load_nifti(path, "mask", ndims=(2, 3))
    except (ImportError, VolumeError) as exc:
        raise CliError(str(exc)) from None
    return torch.from_numpy(data > 0.5)[None, None], img.affine


def compare(path_a: str, path_b: str, args) -> tuple[float, float]:
    import coopseg_kernels as ck

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
    from coopseg_kernels import _backend

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
        from tqdm import tqdm

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
    from .evaluation import paired_wilcoxon

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


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="coopseg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_similarity_parser(sub)
    add_wilcoxon_parser(sub)
    from . import evaluate_cases, infer, toy, train
    from .data import chaos, demo

    # every other feature keeps its code in its own module and registers its subcommand here
    for module in (train, toy, chaos, infer, evaluate_cases, demo):
        module.add_parser(sub)
    return ap


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except CliError as exc:
        print(f"coopseg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # run through the package module, so that there is one CliError class
    from coopseg.cli import main as _main

    sys.exit(_main())
