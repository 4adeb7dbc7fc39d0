"""Training state on disk: atomic writes (temporary file in the same folder, then
os.replace, so a crash never leaves a half-written file) and every RNG state as tensors
and plain values (loadable with torch.load(weights_only=True))."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
