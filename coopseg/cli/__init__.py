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
# The docstring above is `coopseg --help`'s description. This package is the top of the import
# graph: the only place that knows argparse, exit codes and one-line errors. One module per verb
# group (similarity.py: similarity, wilcoxon; training.py: train, toy; volumes.py: import-chaos,
# predict, evaluate, demo-data), each with an `add_parser(subparsers)`; common.py holds what
# they share. Library modules raise coopseg.errors exceptions (ValueError subclasses); the verbs
# turn them into CliError, and main() prints either as `coopseg: error: <message>`, status 2.
from __future__ import annotations

import argparse
import sys

from ..errors import CoopsegError
from . import similarity, training, volumes
from .common import CliError, Parser, out_dir

__all__ = ["CliError", "build_parser", "main", "out_dir"]


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="coopseg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in (similarity, training, volumes):  # this order is `coopseg --help`'s
        group.add_parser(sub)
    return ap


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except (CliError, CoopsegError) as exc:
        print(f"coopseg: error: {exc}", file=sys.stderr)
        return 2
