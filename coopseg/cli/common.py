"""What every verb group of the command line shares: the one-line user error, the parser
class that turns argparse's own errors into one, and the output-folder check."""
from __future__ import annotations

import argparse
from pathlib import Path


class CliError(Exception):
    """A user error: printed without a traceback, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse's own errors (unknown option, bad choice) as one line, like every other user error."""

    def error(self, message):
        raise CliError(message)


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
