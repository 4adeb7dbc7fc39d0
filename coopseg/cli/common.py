"""What every verb group of the command line shares: the one-line user error, the parser
class that turns argparse's own errors into one, the numeric option types, and the
output-folder check."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

FLOAT32_MAX = 3.4028234663852886e38  # the kernels compute in float32: larger values overflow


class CliError(Exception):
    """A user error: printed without a traceback, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse's own errors (unknown option, bad choice) as one line, like every other user error."""

    def error(self, message):
        raise CliError(message)


def positive_float(name: str, *, minimum: float | None = None, minimum_why: str = ""):
    """An argparse type: a finite number > 0 (and >= ``minimum`` when given) that float32 holds."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise CliError(f"{name} must be a number > 0, got {text!r}") from None
        if not (math.isfinite(v) and v > 0):
            raise CliError(f"{name} must be a finite number > 0, got {text!r}")
        if v > FLOAT32_MAX:
            raise CliError(f"{name} must be at most {FLOAT32_MAX:.4g} (computed in float32), got {text!r}")
        if minimum is not None and v < minimum:
            raise CliError(f"{name} must be >= {minimum:g}{minimum_why}, got {text!r}")
        return v
    return parse


def nonneg_int(name: str):
    """An argparse type: an integer >= 0."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise CliError(f"{name} must be an integer >= 0, got {text!r}") from None
        if v < 0:
            raise CliError(f"{name} must be an integer >= 0, got {text!r}")
        return v
    return parse


def fraction(name: str):
    """An argparse type: a number in [0, 1)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if not 0 <= v < 1:
            raise CliError(f"{name} must be a number in [0, 1), got {text!r}")
        return v
    return parse


def out_dir(text: str, name: str = "--out") -> Path:
    """An output folder argument: it, or its nearest existing ancestor, must be a writable
    folder (a file there would fail deep inside mkdir with a traceback, after the work)."""
    path = Path(text)
    for q in (path, *path.parents):
        if q.exists():
            if not q.is_dir():
                raise CliError(f"{name}: {q} exists and is not a directory")
            if not os.access(q, os.W_OK | os.X_OK):
                raise CliError(f"{name}: the folder {q} is not writable")
            break
    return path
