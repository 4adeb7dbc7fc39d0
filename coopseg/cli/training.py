"""`coopseg train` (the three training stages of coopseg.train) and `coopseg toy` (the §3.1
lambda sweep of coopseg.toy)."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys

import torch
import torch.distributed as dist

from .. import toy, train
from ..config import TOY_PAIRS_MAX
from ..errors import ConfigError
from .common import CliError, out_dir


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the segmentor and the registor (three stages)",
                              description=train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see --write-config)")
    p.add_argument("--out", help="output folder: log.csv, last.pt, config.yaml")
    p.add_argument("--resume", action="store_true", help="continue OUT/last.pt")
    p.add_argument("--write-config", metavar="CFG.yaml", help="write the documented default config and exit")
    p.set_defaults(fn=cmd_train)


def cmd_train(args) -> int:
    if args.write_config:
        if args.config or args.out or args.resume:
            raise CliError("--write-config takes no other option")
        train.write_default_config(args.write_config)
        print(f"wrote {args.write_config}")
        return 0
    if not args.config or not args.out:
        raise CliError("train needs --config CFG.yaml and --out DIR (or --write-config CFG.yaml)")
    try:
        config = train.load_config(args.config)
        out = out_dir(args.out)
        # (OUT/last.pt without --resume is refused inside the run's lock on OUT)
        path = train.train(config, out, resume=args.resume, overwrite=False)
    except train.Interrupted as exc:
        print(f"coopseg train: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:  # Ctrl-C before the loop's handler (loading, first step's setup)
        print("coopseg train: interrupted before training started; nothing written to the checkpoint",
              file=sys.stderr)
        return 128 + signal.SIGINT
    except ValueError as exc:  # ConfigError and data errors: one line, exit 2
        raise CliError(str(exc)) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"coopseg train: done; {path}")
    return 0


def add_toy_parser(subparsers) -> None:
    p = subparsers.add_parser("toy", help="the toy lambda sweep of §3.1 (D_S gain of predictions vs annotations)")
    p.add_argument("--out", required=True, help="output directory (checkpoints, toy.csv, toy.png, toy.md)")
    p.add_argument("--full", action="store_true", help="the paper's 30 models at full width (GPU)")
    p.add_argument("--lambda-r", type=float, nargs="+", default=None, metavar="V",
                   help="lambda_r values in [0, 1] (default: 5 reduced / 30 full)")
    p.add_argument("--test-pairs", type=int, default=None, help="held-out toy pairs (default 30 reduced / 200 full)")
    p.add_argument("--steps", type=int, nargs=3, default=None, metavar=("SEG", "REG", "JOINT"),
                   help="training steps of the three stages")
    p.add_argument("--width", type=float, default=None, help="segmentor width multiplier")
    p.add_argument("--max-shift", type=int, nargs="+", default=None, metavar="PX",
                   help="largest translation between s1 and s2, px per axis, train and test (paper: 32; "
                        "default: 0 reduced, 32 full); several values: one sweep per value "
                        "in DIR/shift_<PX> and a table/plot of the gain against the shift (DIR/shifts.*)")
    p.add_argument("--crop", type=int, default=None, help="training crop size (a multiple of 16, <= 240)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu reduced, cuda full)")
    p.add_argument("--segmentor", choices=("genesis", "unet"), default=None,
                   help="the 2-D segmentor: genesis (Models Genesis U-Net, 3 pools) or unet (ToyUNet, more pools)")
    p.add_argument("--oracle", action="store_true",
                   help="the oracle gate: train the segmentor on (s1, s2* = s1 moved by the true shift) and report "
                        "Dice(ŝ2, s2*), Dice(ŝ2, s2) and the D_S gain: the ceiling any lambda can reach "
                        "(DIR/oracle.md)")
    p.set_defaults(fn=cmd_toy)


def settings_from_args(args) -> toy.ToySettings:
    s = toy.FULL if args.full else toy.REDUCED
    changes = {}
    if args.lambda_r is not None:
        bad = [v for v in args.lambda_r if not (0.0 <= v <= 1.0) or math.isnan(v)]
        if bad:
            raise CliError(f"--lambda-r: values must be in [0, 1], got {bad[0]}")
        changes["lambda_r"] = tuple(args.lambda_r)
    if args.test_pairs is not None:
        if not 1 <= args.test_pairs <= TOY_PAIRS_MAX:
            raise CliError(f"--test-pairs: must be in [1, {TOY_PAIRS_MAX}], got {args.test_pairs}")
        changes["test_pairs"] = args.test_pairs
    if args.steps is not None:
        if min(args.steps) < 0:
            raise CliError(f"--steps: must be >= 0, got {args.steps}")
        changes.update(steps_segmentor=args.steps[0], steps_registor=args.steps[1], steps_joint=args.steps[2])
    if args.width is not None:
        if not (math.isfinite(args.width) and args.width > 0):
            raise CliError(f"--width: must be a finite number > 0, got {args.width}")
        changes["width"] = args.width
    if args.max_shift is not None:
        bad = [v for v in args.max_shift if not 0 <= v <= toy.PAPER_SHIFT]
        if bad:
            raise CliError(f"--max-shift: must be ints in [0, {toy.PAPER_SHIFT}] (pixels), got {bad[0]}")
        if len(set(args.max_shift)) != len(args.max_shift):
            raise CliError(f"--max-shift: values must be distinct, got {args.max_shift}")
        changes["max_shift"] = args.max_shift[0]
    if args.crop is not None:
        if args.crop <= 0 or args.crop % 16 or args.crop > 240:
            raise CliError(f"--crop: must be a multiple of 16 in [16, 240], got {args.crop}")
        changes.update(crop_min=args.crop, crop_max=args.crop)
    if args.device is not None:
        if args.device not in ("cpu", "cuda"):
            raise CliError(f"--device: expected cpu or cuda, got {args.device!r}")
        changes["device"] = args.device
    if args.segmentor is not None:
        changes["segmentor"] = args.segmentor
    s = dataclasses.replace(s, **changes)
    if s.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda (the --full default): no CUDA device; pass --device cpu to run it here")
    return s


def cmd_toy(args) -> int:
    settings = settings_from_args(args)
    out = out_dir(args.out)
    log = lambda m: print(m, file=sys.stdout, flush=True)  # noqa: E731
    try:
        if args.oracle:
            if args.max_shift is not None and len(args.max_shift) > 1:
                raise CliError("--oracle takes one --max-shift value")
            toy.run_oracle(out, settings, log=log)
        elif args.max_shift is not None and len(args.max_shift) > 1:
            toy.run_shift_sweep(out, settings, args.max_shift, log=log)
        else:
            toy.run_toy(out, settings, log=log)
    except ConfigError as exc:  # a setting the training layer rejects: one line
        raise CliError(str(exc).splitlines()[0]) from None
    except train.Interrupted as exc:  # SIGTERM / SIGINT in a training stage: its checkpoint is written
        print(f"coopseg toy: stopped by {signal.Signals(exc.signum).name} after step {exc.step} of "
              f"{exc.checkpoint.parent}; run the same command again to continue", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:  # Ctrl-C outside a training stage (data, evaluation)
        print("coopseg toy: interrupted; run the same command again to continue (trained sweep points are kept)",
              file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


def add_parser(subparsers) -> None:
    add_train_parser(subparsers)
    add_toy_parser(subparsers)
