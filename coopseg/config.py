"""The training config: every key of `coopseg train --config CFG.yaml`, its default, its
documentation (written by `coopseg train --write-config`) and its validation."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import coopseg_kernels as ck

from .checkpoint import atomic_write_text
from .errors import ConfigError
from .losses import BLUR_SIGMA_MAX
from .models import NORMS, OMEGAS, POOLS, WIDTH_MAX

CROP_MULTIPLE = 16  # the registor pools 4 times


def _doc(text: str, default: Any) -> Any:
    return field(default=default, metadata={"doc": text}) if not isinstance(default, list) else \
        field(default_factory=lambda: list(default), metadata={"doc": text})


@dataclass
class Config:
    """Every key of a training config (YAML). `coopseg train --write-config` writes these defaults."""
    seed: int = _doc("seeds model init and every random draw of the loop", 0)
    data: str = _doc("'toy' (coopseg.data.toy, 2-D) or the path of a .csv manifest of real volumes", "toy")
    spatial_dims: int = _doc("2 or 3", 2)
    toy_pairs: int = _doc("data='toy': number of training pairs", 200)
    toy_size: int = _doc("data='toy': image size in pixels (the paper: 240)", 240)
    toy_max_shift: Any = _doc("data='toy': largest translation of s2 vs s1, pixels per axis; null = "
                              "32 * toy_size / 240 (the paper's 32 px)", None)
    steps_segmentor: int = _doc("stage 1: steps of the segmentor alone with L_r", 300)
    steps_registor: int = _doc("stage 2: steps of the registor alone with L_g on the annotation masks", 300)
    steps_joint: int = _doc("stage 3: steps of both with lambda_r L_r + lambda_g L_g + lambda_p L_p", 300)
    lambda_r: float = _doc("weight of the segmentation loss L_r in stage 3 (paper, liver: 0.1)", 0.1)
    lambda_g: float = _doc("weight of the registration loss L_g in stage 3 (paper: 1)", 1.0)
    lambda_p: float = _doc("weight of the similarity loss L_p in stage 3 (paper, liver: 1)", 1.0)
    sim_to_s1: bool = _doc("ablation: L_p also trains through the first mask (paper: false)", False)
    sim_to_registor: bool = _doc("ablation: L_p also trains the registor (paper: false)", False)
    crop_min: Any = _doc("smallest crop side (int, or one per axis); a multiple of 16", 64)
    crop_max: Any = _doc("largest crop side (int, or one per axis); a multiple of 16", 160)
    intensity_shift: float = _doc("each image gets + U(-a, a) per step (augmentation)", 0.1)
    lr: float = _doc("Adam learning rate", 1e-3)
    registor_lr: float = _doc("Adam learning rate of the registor's parameters (0 = lr)", 0.0)
    width: float = _doc("segmentor channel multiplier (1 = Models Genesis, needed to load its weights)", 0.25)
    norm: str = _doc("segmentor normalisation: cont_bn (Genesis) | batch | instance", "cont_bn")
    omega: str = _doc("registor output: elastic (1/16 grid) | translation (one vector; the toy task)",
                      "translation")
    registor_scale: float = _doc("gain on the registor output (voxels per unit); 1 = the paper", 8.0)
    registor_pool: str = _doc("omega translation: mean (the spec's global average) | mask (weighted by the mask "
                              "mass each location sees; README 'Toy experiment')", "mean")
    blur_sigma: float = _doc("L_g's blur: 0 = the paper's [1, 2, 1]; > 0 = a Gaussian of this std (voxels)", 0.0)
    genesis: str = _doc("path of Models Genesis weights to start the segmentor from ('' = none; 3-D)", "")
    checkpointing: bool = _doc("activation checkpointing of the network levels (less memory)", False)
    bf16: bool = _doc("bf16 autocast of the networks on CUDA (ignored on CPU)", True)
    device: str = _doc("auto | cpu | cuda | cuda:N (torchrun: cuda:LOCAL_RANK)", "auto")
    backend: str = _doc("coopseg_kernels backend for warp/blur: auto | cpp | triton | reference", "auto")
    checkpoint_every: int = _doc("write OUT/last.pt every this many steps (and at the end)", 100)
    progress: bool = _doc("show a tqdm progress bar", True)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Config":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ConfigError(f"{source}: unknown key {key!r} (known keys: {', '.join(sorted(known))})")
        cfg = cls(**d)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        def fail(key, expected):
            raise ConfigError(f"{source}: {key}: expected {expected}, got {getattr(self, key)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            try:  # an int too large for a float is not a usable number either
                return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            except OverflowError:
                return False

        for key in ("seed", "steps_segmentor", "steps_registor", "steps_joint"):
            if not (is_int(getattr(self, key)) and getattr(self, key) >= 0):
                fail(key, "an int >= 0")
        for key in ("toy_pairs", "checkpoint_every"):
            if not (is_int(getattr(self, key)) and getattr(self, key) >= 1):
                fail(key, "an int >= 1")
        if self.spatial_dims not in (2, 3) or isinstance(self.spatial_dims, bool):
            fail("spatial_dims", "2 or 3")
        if not (isinstance(self.data, str) and (self.data == "toy" or self.data.endswith(".csv"))):
            fail("data", "'toy' or the path of a .csv manifest")
        if self.data == "toy" and self.spatial_dims != 2:
            fail("spatial_dims", "2 with data: toy (the toy pairs are 2-D)")
        if not (is_int(self.toy_size) and self.toy_size >= 32 and self.toy_size % CROP_MULTIPLE == 0):
            fail("toy_size", "an int >= 32, a multiple of 16")
        if self.toy_max_shift is not None and not (
                is_int(self.toy_max_shift) and 0 <= self.toy_max_shift < self.toy_size // 4):
            fail("toy_max_shift", f"null or an int in [0, toy_size / 4) = [0, {self.toy_size // 4})")
        for key in ("lambda_r", "lambda_g", "lambda_p", "intensity_shift", "blur_sigma", "registor_lr"):
            if not (is_num(getattr(self, key)) and getattr(self, key) >= 0):
                fail(key, "a number >= 0")
        for key in ("lr", "width", "registor_scale"):
            if not (is_num(getattr(self, key)) and getattr(self, key) > 0):
                fail(key, "a number > 0")
        if self.blur_sigma > BLUR_SIGMA_MAX:
            fail("blur_sigma", f"a number in [0, {BLUR_SIGMA_MAX:g}] (voxels)")
        if self.width > WIDTH_MAX:
            fail("width", f"a number in (0, {WIDTH_MAX}]")
        for key in ("sim_to_s1", "sim_to_registor", "checkpointing", "bf16", "progress"):
            if not isinstance(getattr(self, key), bool):
                fail(key, "true or false")
        for key, options in (("norm", NORMS), ("omega", OMEGAS), ("registor_pool", POOLS),
                             ("backend", ck.BACKENDS)):
            if getattr(self, key) not in options:
                fail(key, "one of " + " | ".join(options))
        if self.registor_pool != "mean" and self.omega != "translation":
            fail("registor_pool", "mean with omega: elastic (only the translation registor is pooled)")
        if not isinstance(self.genesis, str):
            fail("genesis", "a path or ''")
        if self.genesis and self.spatial_dims != 3:
            fail("genesis", "'' with spatial_dims: 2 (Models Genesis weights are 3-D)")
        if not isinstance(self.device, str) or not (
                self.device in ("auto", "cpu", "cuda") or
                (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            fail("device", "auto | cpu | cuda | cuda:N")
        lo, hi = self.crop_bounds()
        for key, sides in (("crop_min", lo), ("crop_max", hi)):
            if sides is None:
                fail(key, f"an int or a list of {self.spatial_dims} ints, each a multiple of 16 and >= 16")
        if any(a > b for a, b in zip(lo, hi)):
            fail("crop_min", f"sides <= crop_max {self.crop_max!r}")

    def crop_bounds(self):
        """(crop_min, crop_max) as tuples of spatial_dims ints (None where invalid)."""
        def sides(v):
            if isinstance(v, int) and not isinstance(v, bool):
                v = [v] * self.spatial_dims
            if not (isinstance(v, (list, tuple)) and len(v) == self.spatial_dims and all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= CROP_MULTIPLE and n % CROP_MULTIPLE == 0
                    for n in v)):
                return None
            return tuple(v)
        return sides(self.crop_min), sides(self.crop_max)

    def to_dict(self) -> dict:
        """Plain YAML-able values (tuples of crop sides become lists)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def load_config(path) -> Config:
    """Read a YAML config; unknown keys and bad values raise ConfigError naming the key."""
    import yaml  # lazy on purpose (as everywhere here): only config files need it

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return Config.from_dict({} if d is None else d, source=str(path))


def write_default_config(path) -> None:
    """Write the defaults as YAML, one comment per key."""
    import yaml  # lazy on purpose

    lines = ["# coopseg training config (coopseg train --config THIS --out DIR). Defaults: the toy task.",
             "# The paper's 3-D liver setting: data: manifest.csv, spatial_dims: 3, width: 1.0, omega: elastic,",
             "# registor_scale: 1.0, lambda_r: 0.1, lambda_g: 1, lambda_p: 1, genesis: Genesis_Chest_CT.pt."]
    for f in dataclasses.fields(Config):
        value = yaml.safe_dump({f.name: getattr(Config(), f.name)}, default_flow_style=True, width=1000).strip()
        lines += [f"# {f.metadata['doc']}", value[1:-1]]
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
