"""Training state on disk: atomic writes (temporary file in the same folder, then
os.replace, so a crash never leaves a half-written file), every RNG state as tensors
and plain values (loadable with torch.load(weights_only=True)), checked loading of a
checkpoint, and the lock that keeps one process at a time in an output folder."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import re
import socket
import time
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError, CoopsegError

LOCK_NAME = ".lock"
_TMP = re.compile(r"^\..+\.tmp(\d+)$")  # what _tmp_path names: .<name>.tmp<pid>


class OutputError(CoopsegError):
    """An output folder or file that cannot be written, or a folder another run is using."""


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _write_failed(path: Path, tmp: Path, exc: OSError) -> OutputError:
    with contextlib.suppress(OSError):
        tmp.unlink()
    return OutputError(f"cannot write {path}: {exc.strerror or exc}" +
                       (f"; the previous {path.name} is kept" if path.is_file() else ""))


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_failed(path, tmp, exc) from None


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace
    (OutputError, the previous file kept, when the disk is full or the folder read-only)."""
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_failed(path, tmp, exc) from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # someone else's process (or a pid the OS cannot hold: not alive)
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files (.<name>.tmp<pid>) that a killed write left in `folder`:
    those whose process is gone (a live process's are kept). Returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for p in Path(folder).iterdir():
            m = _TMP.match(p.name)
            if m and p.is_file() and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed


def _holder(path: Path) -> str:
    """'pid 123 on host, since <time>' from a lock file (best effort)."""
    try:
        fields = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    except OSError:
        fields = {}
    if "pid" not in fields:
        return "another process"
    text = f"pid {fields['pid']}"
    if fields.get("host") and fields["host"] != socket.gethostname():
        text += f" on {fields['host']}"
    if fields.get("started"):
        text += f", started {fields['started']}"
    return text


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "run"):
    """Hold FOLDER/.lock (fcntl.flock, exclusive) while the block runs: a second process
    (another run, a --resume of this one) gets OutputError naming the folder and the
    holder's pid. The OS releases the lock when its process dies, so a lock file left by a
    killed run (kill -9) is taken over. The file holds pid, host and start time; it is
    removed on exit (checked by inode, so a waiting process never locks a removed file)."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(f"{folder} is in use by another {what} ({_holder(path)}; lock {path}): "
                                  f"wait for it to end, or choose another output folder") from None
            raise OutputError(f"cannot lock {path}: {exc.strerror or exc}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and flock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, (f"pid={os.getpid()}\nhost={socket.gethostname()}\n"
                      f"started={time.strftime('%Y-%m-%d %H:%M:%S %z')}\n").encode())
    except OSError:
        pass  # the lock holds without its note
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def first_nonfinite(state: dict) -> str | None:
    """The name of the first floating-point tensor of a state_dict with a NaN or inf, or None."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def load_checkpoint(path, map_location="cpu", *, keys=("model", "config")) -> dict:
    """torch.load(weights_only=True) of a coopseg checkpoint; CheckpointError naming the file
    when it is missing, a folder, truncated, not a checkpoint, or lacks one of `keys`."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a checkpoint file (e.g. {path / 'last.pt'})")
    if not path.is_file():
        if path.is_symlink():
            raise CheckpointError(f"{path}: a link to {os.readlink(path)}, which does not exist")
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, a pickle of other objects, text...: several types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: cannot load as a coopseg checkpoint (truncated, or not one: "
                              f"{type(exc).__name__}{': ' + first[:200] if first else ''})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a coopseg checkpoint (holds a {type(ckpt).__name__}, "
                              f"expected the dict that coopseg train writes)")
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a coopseg training checkpoint (no {', '.join(map(repr, missing))} "
                              f"entry; it has {', '.join(map(repr, list(ckpt)[:8])) or 'none'})")
    if "model" in keys and not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: not a coopseg training checkpoint ('model' is not a state_dict)")
    return ckpt


def check_finite(state: dict, path) -> None:
    """CheckpointError naming the file and the first parameter with a NaN or inf."""
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(f"{path}: parameter {bad!r} has non-finite values (NaN or inf): the run that wrote "
                              f"it diverged; use an earlier checkpoint or retrain with a smaller lr")


def rng_state(gen: torch.Generator) -> dict:
    """Every RNG state, as tensors and plain ints (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(
        data=gen.get_state(),
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                   has_gauss=int(has_gauss), gauss=float(gauss)),
        python=random.getstate(),
    )


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    gen.set_state(state["data"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
