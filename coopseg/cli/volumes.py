"""The verbs on real volumes: `coopseg import-chaos` (coopseg.data.chaos), `coopseg predict`
(coopseg.infer), `coopseg evaluate` (coopseg.evaluation) and `coopseg demo-data`
(coopseg.data.demo)."""
from __future__ import annotations

from .. import evaluation, infer
from ..data import chaos, demo
from ..errors import CoopsegError
from .common import CliError, fraction, nonneg_int, out_dir, positive_float

# library parameters that are options of these verbs: their errors name the option
_OPTIONS = ("patch", "overlap", "iters", "grid_spacing", "omega")


def _as_option(exc: Exception) -> CliError:
    """A library error as a CLI error; 'patch must be ...' becomes '--patch must be ...'."""
    msg = str(exc)
    for name in _OPTIONS:
        if msg.startswith(f"{name} must"):
            return CliError("--" + name.replace("_", "-") + msg[len(name):])
    return CliError(msg)


def add_chaos_parser(subparsers) -> None:
    p = subparsers.add_parser("import-chaos", help="CHAOS MR DICOM + PNG masks -> NIfTI pairs and manifest.csv")
    p.add_argument("dir", help="CHAOS folder (containing MR/<id>/... or <id>/...)")
    p.add_argument("out", help="output folder (OUT/<id>/*.nii.gz, OUT/manifest.csv)")
    p.set_defaults(fn=cmd_import_chaos)


def cmd_import_chaos(args) -> int:
    out_dir(args.out, "OUT")  # a file in the way fails now, not after every patient is read
    try:
        manifest = chaos.import_chaos(args.dir, args.out)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(f"wrote {manifest}")
    return 0


def add_window_arguments(p) -> None:
    p.add_argument("--patch", default=None,
                   help="window size: N or I,J,K, multiples of 16 (default: the config's crop_max, else 64)")
    p.add_argument("--overlap", type=fraction("--overlap"), default=0.5,
                   help="window overlap fraction in [0, 1) (default 0.5)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def add_predict_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="masks of a T1/T2 pair with a trained checkpoint (sliding window)")
    p.add_argument("--t1", required=True, help="T1 image (NIfTI); its grid is the network's")
    p.add_argument("--t2", required=True, help="T2 image (NIfTI)")
    p.add_argument("--checkpoint", required=True, help="training checkpoint (OUT/last.pt)")
    p.add_argument("--out", required=True, help="output folder: t1_mask.nii.gz, t2_mask.nii.gz[, field.nii.gz]")
    add_window_arguments(p)
    p.add_argument("--field", action="store_true", help="also write the registor's displacement field")
    p.set_defaults(fn=cmd_predict)


def cmd_predict(args) -> int:
    try:
        paths = infer.predict_files(args.t1, args.t2, args.checkpoint, out_dir(args.out), patch=args.patch,
                                    overlap=args.overlap, device=args.device, field=args.field)
    except ValueError as exc:
        raise _as_option(exc) from None
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def add_evaluate_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="the paper's §3.2.3 table on an annotated manifest")
    p.add_argument("--manifest", required=True, help="CSV of annotated pairs (t1, t2, t1_mask, t2_mask)")
    p.add_argument("--checkpoint", required=True, help="training checkpoint (OUT/last.pt)")
    p.add_argument("--out", required=True,
                   help="per-case CSV (one row per case); beside it: .mean.csv (the mean), .txt (table), .png")
    add_window_arguments(p)
    p.add_argument("--omega", choices=["elastic", "translation"], default=None,
                   help="Ω of D_S (default: the checkpoint's)")
    p.add_argument("--grid-spacing", default=16.0,
                   type=positive_float("--grid-spacing", minimum=1.0, minimum_why=" (voxels between coarse nodes)"),
                   help="elastic Ω: voxels between coarse nodes (>= 1)")
    p.add_argument("--iters", type=nonneg_int("--iters"), default=300, help="D_S optimizer iterations")
    p.set_defaults(fn=cmd_evaluate)


def cmd_evaluate(args) -> int:
    if not args.out.strip():
        raise CliError("--out: empty path")
    try:  # the outputs first, named as the option: nothing is computed before they are known to work
        evaluation.check_outputs(args.out, inputs=(args.manifest, args.checkpoint), name="--out")
        _, _, table = evaluation.evaluate(args.manifest, args.checkpoint, args.out, patch=args.patch,
                                          overlap=args.overlap, device=args.device, omega=args.omega,
                                          grid_spacing=args.grid_spacing, iters=args.iters)
    except (ValueError, CoopsegError) as exc:
        raise _as_option(exc) from None
    paths = evaluation.output_paths(args.out)
    print(table)
    print(f"per case: {paths['per-case CSV']}  mean: {paths['mean CSV']}")
    return 0


def add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser("demo-data", help="demo pairs from the MNI152 templates in the nilearn wheel (offline)")
    p.add_argument("out", help="output folder (pair_XX/*.nii.gz, train.csv, test.csv)")
    p.add_argument("--pairs", type=nonneg_int("--pairs"), default=10, help="number of pairs (default 10)")
    p.add_argument("--test", type=nonneg_int("--test"), default=4, help="of which for testing (default 4)")
    p.add_argument("--seed", type=nonneg_int("--seed"), default=0)
    p.set_defaults(fn=cmd_demo_data)


def cmd_demo_data(args) -> int:
    if not 1 <= args.test < args.pairs:  # before the templates are read
        raise CliError(f"--test must be >= 1 and below --pairs (pairs for training remain), "
                       f"got --pairs {args.pairs} --test {args.test}")
    try:
        train, test = demo.make_demo_data(args.out, pairs=args.pairs, test=args.test, seed=args.seed)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(f"wrote {train} and {test}")
    return 0


def add_parser(subparsers) -> None:
    for add in (add_chaos_parser, add_predict_parser, add_evaluate_parser, add_demo_parser):  # `--help`'s order
        add(subparsers)
