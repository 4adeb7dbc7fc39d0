"""The CSV tables coopseg reads (manifests, `similarity --pairs` lists, `wilcoxon` score
tables) and the result files it writes, in one place so that every verb reads them alike.

Reading (:func:`read_rows`, :func:`read_table`): UTF-8 text, with or without a byte-order
mark (Excel's "CSV UTF-8"); any line ending (``\\n``, ``\\r\\n``, ``\\r``); cells are stripped
of surrounding spaces; rows whose cells are all empty are skipped. A missing file, a folder,
an empty file, a header without rows, a binary file, a NIfTI image, UTF-16 or other non-UTF-8
text, a file over :data:`MAX_BYTES`, duplicate column names and a row with more cells than the
header are errors naming the file (and the line). Paths in a table are relative to the
table's folder (:func:`resolve_path`).

Writing (:func:`check_output_file`, :func:`atomic_output`): an output file is checked before
any work starts (not a folder, no file in the way of its folder, not one of the inputs),
and written to a temporary file beside it that replaces it only when complete, so a failed
run never leaves a partial table that looks like a result.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import CoopsegError

MAX_BYTES = 256 * 2**20  # a table larger than this is not a list of cases (a volume given by mistake?)


def _sniff(path: Path, head: bytes, what: str, error) -> None:
    """Refuse files that are not CSV text, saying what they look like."""
    if head[:2] == b"\x1f\x8b":
        raise error(f"{path}: a gzip-compressed file (a .nii.gz image?), not a CSV {what}")
    if head[344:348] in (b"n+1\0", b"ni1\0") or head[4:8] in (b"n+2\0", b"ni2\0"):
        raise error(f"{path}: a NIfTI image, not a CSV {what}")
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise error(f"{path}: UTF-16 text; save the {what} as CSV in UTF-8")


def read_rows(path, what: str = "table", *, error=CoopsegError) -> list[tuple[int, list[str]]]:
    """The non-blank rows of a CSV file as (line number, stripped cells).

    ``what`` names the file's role in messages ("manifest", "pairs list", ...); ``error`` is
    the exception class raised (a CoopsegError)."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a folder, not a CSV {what}")
    if not path.exists():
        raise error(f"{path}: no such {what} file")
    try:  # a regular file, or a pipe (`--pairs <(make-list)`): read as a stream, never more than MAX_BYTES
        with open(path, "rb") as f:
            head = f.read(512)
            _sniff(path, head, what, error)
            data = head + f.read(MAX_BYTES + 1 - len(head))
            if len(data) > MAX_BYTES:
                raise error(f"{path}: too large for a CSV {what} (more than {MAX_BYTES // 2**20} MiB)")
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if not data.strip():
        raise error(f"{path}: the {what} is empty")
    if b"\0" in data:
        raise error(f"{path}: a binary file, not a CSV {what}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
                    f"a binary file, or save the {what} as CSV in UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = []
    try:
        for cells in reader:
            cells = [c.strip() for c in cells]
            if any(cells):
                rows.append((reader.line_num, cells))
    except csv.Error as exc:
        raise error(f"{path}, line {reader.line_num}: not readable as CSV ({exc})") from None
    if not rows:
        raise error(f"{path}: the {what} is empty")
    return rows


@dataclass
class Table:
    """A CSV file with a header: ``header`` (stripped names), ``rows`` (cells, padded with
    empty strings to the header's length) and ``lines`` (each row's line in the file)."""
    path: Path
    what: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def column(self, name: str) -> list[str]:
        i = self.header.index(name)
        return [r[i] for r in self.rows]

    def where(self, k: int, column: str | None = None) -> str:
        """'PATH, line N[, column NAME]' of data row k (0-based)."""
        return f"{self.path}, line {self.lines[k]}" + (f", column {column!r}" if column is not None else "")


def separator_hint(header: Sequence[str]) -> str:
    """'; ... separated by commas' when a header is one name holding ';' or a tab (a CSV
    written with another separator), else ''."""
    if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
        return f"; its header is one column {header[0]!r}: columns must be separated by commas"
    return ""


def read_table(path, what: str = "table", *, required: Sequence[str] = (), expected: str | None = None,
               error=CoopsegError) -> Table:
    """A CSV file whose first non-blank row is its header. Refuses duplicate column names,
    a missing ``required`` column (``expected`` describes the columns wanted), a row with
    more non-empty cells than the header has names, and a header without rows."""
    path = Path(path)
    (line0, header), *rest = read_rows(path, what, error=error)
    seen = {}
    for i, name in enumerate(header):
        if name and name in seen:
            raise error(f"{path}: column {name!r} appears twice in the header (line {line0})")
        seen[name] = i
    missing = [c for c in required if c not in seen]
    if missing:
        want = expected or ", ".join(required)
        raise error(f"{path}: {what} needs the columns {want}; missing {', '.join(missing)} "
                    f"(header: {', '.join(repr(h) for h in header)}){separator_hint(header)}")
    if not rest:
        raise error(f"{path}: {what} has no rows (only a header)")
    table = Table(path=path, what=what, header=header)
    for line, cells in rest:
        if len(cells) > len(header) and any(cells[len(header):]):
            raise error(f"{path}, line {line}: {len(cells)} cells, but the header (line {line0}) names "
                        f"{len(header)} columns")
        table.rows.append((cells + [""] * len(header))[:len(header)])
        table.lines.append(line)
    return table


def resolve_path(cell: str, base) -> Path:
    """A path written in a table: ``~`` expanded, relative paths taken from ``base`` (the
    table's folder)."""
    p = Path(cell).expanduser()
    return p if p.is_absolute() else Path(base) / p


def same_file(a, b) -> bool:
    """Whether two paths name one file (after resolving links; existing or not)."""
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except (OSError, ValueError):
        return False


def check_output_file(path, what: str, *, name: str = "out", inputs=(), error=CoopsegError) -> Path:
    """Before any work: ``path`` can be written as a file. It must not be a folder, the
    nearest existing folder above it must be a writable folder (missing folders are created
    when it is written), and it must not be one of ``inputs`` (files the run reads)."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{name} {path}: is a folder; the {what} is written to a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise error(f"{name} {path}: exists and is not writable")
    for q in path.parents:
        if q.exists() or q.is_symlink():
            if not q.is_dir():
                raise error(f"{name} {path}: {q} is a file, not a folder")
            if not os.access(q, os.W_OK | os.X_OK):
                raise error(f"{name} {path}: the folder {q} is not writable")
            break
    for i in inputs:
        if i is not None and same_file(path, i):
            raise error(f"{name} {path}: is also an input of this run ({i}); writing it would overwrite it")
    return path


@contextlib.contextmanager
def atomic_output(path, mode: str = "w") -> Iterator:
    """Open a temporary file beside ``path`` (its folders created); on success it replaces
    ``path``, on an exception it is removed and ``path`` is left as it was. A symbolic link
    is followed (its target is replaced); something that is not a regular file (``/dev/null``,
    a named pipe) is written directly."""
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    if path.exists() and not path.is_file():
        with open(path, mode, newline="" if "b" not in mode else None) as f:
            yield f
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, newline="" if "b" not in mode else None) as f:
            yield f
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what open() would have given
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_csv(path, header: Sequence[str], rows) -> Path:
    """Write a CSV table atomically (:func:`atomic_output`)."""
    with atomic_output(path) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return Path(path)
