"""The training config: every key of `coopseg train --config CFG.yaml`, its default, its
documentation (written by `coopseg train --write-config`) and its validation."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import coopseg_kernels as ck

from .data import TOY_PAIRS_MAX
from .data.toy import TARGETS as TOY_TARGETS
from .errors import ConfigError
from .losses import BLUR_SIGMA_MAX
from .models import NORMS, OMEGAS, POOLS, SEGMENTORS, UNET_CONTEXTS, UNET_LEVELS_MAX, WIDTH_MAX

CROP_MULTIPLE = 16  # the registor pools 4 times
SEED_LIMIT = 2**40  # seeds are ints in [0, 2**40): the toy data and every generator of the loop take them
STEPS_MAX = 10**9  # steps of a stage, and checkpoint_every
TOY_SIZE_MAX = 2048
CONFIG_BYTES_MAX = 1 << 20  # a config is a few kB; anything larger is the wrong file
REQUIRED_KEYS = ("data",)  # a config names its data: an empty or partial file never trains the toy by accident
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda|cuda:(0|[1-9][0-9]{0,3})", re.ASCII)


def _doc(text: str, default: Any) -> Any:
    return field(default=default, metadata={"doc": text}) if not isinstance(default, list) else \
        field(default_factory=lambda: list(default), metadata={"doc": text})


@dataclass
class Config:
    """Every key of a training config (YAML). `coopseg train --write-config` writes these defaults."""
    seed: int = _doc("seeds model init and every random draw of the loop (an int in [0, 2**40))", 0)
    data: str = _doc("'toy' (coopseg.data.toy, 2-D) or the path of a .csv manifest of real volumes (relative: "
                     "to this file's folder); every config names it", "toy")
    spatial_dims: int = _doc("2 or 3", 2)
    toy_pairs: int = _doc("data='toy': number of training pairs", 200)
    toy_size: int = _doc("data='toy': image size in pixels (the paper: 240)", 240)
    toy_max_shift: Any = _doc("data='toy': largest translation of s2 vs s1, pixels per axis; null = "
                              "32 * toy_size / 240 (the paper's 32 px)", None)
    toy_target: str = _doc("data='toy': s2 (the annotation) | oracle (s1 translated by the pair's shift: "
                           "the oracle gate, docs/toy.md#the-oracle-gate)", "s2")
    steps_segmentor: int = _doc("stage 1: steps of the segmentor alone with L_r", 300)
    steps_registor: int = _doc("stage 2: steps of the registor alone with L_g on the annotation masks", 300)
    steps_joint: int = _doc("stage 3: steps of both with lambda_r L_r + lambda_g L_g + lambda_p L_p", 300)
    lambda_r: float = _doc("weight of the segmentation loss L_r in stage 3 (paper, liver: 0.1)", 0.1)
    lambda_g: float = _doc("weight of the registration loss L_g in stage 3 (paper: 1)", 1.0)
    lambda_p: float = _doc("weight of the similarity loss L_p in stage 3 (paper, liver: 1)", 1.0)
    inside_only: bool = _doc("L_p and L_g ignore the voxels whose sampled position lies outside the moving crop "
                             "(docs/training.md#losses)", True)
    sim_to_s1: bool = _doc("ablation: L_p also trains through the first mask (paper: false)", False)
    sim_to_registor: bool = _doc("ablation: L_p also trains the registor (paper: false)", False)
    crop_min: Any = _doc("smallest crop side (int, or one per axis); a multiple of 16", 64)
    crop_max: Any = _doc("largest crop side (int, or one per axis); a multiple of 16", 160)
    intensity_shift: float = _doc("each image gets + U(-a, a) per step (augmentation)", 0.1)
    lr: float = _doc("Adam learning rate", 1e-3)
    registor_lr: float = _doc("Adam learning rate of the registor's parameters (0 = lr)", 0.0)
    width: float = _doc("segmentor channel multiplier (1 = Models Genesis, needed to load its weights)", 0.25)
    segmentor: str = _doc("genesis (Models Genesis U-Net, 3 pools; the paper's) | unet (coopseg.models.ToyUNet, "
                          "2-D: more pools, unet_* keys)", "genesis")
    unet_levels: int = _doc("segmentor unet: number of 2x max-pools", 5)
    unet_context: str = _doc("segmentor unet: none | dilated (convs of dilation 1, 2, 4 at the bottleneck) | "
                             "attention (self-attention over the bottleneck)", "none")
    unet_coords: bool = _doc("segmentor unet: append (y, x) coordinate channels to the input", False)
    norm: str = _doc("segmentor normalisation: cont_bn (Genesis) | batch | instance", "cont_bn")
    omega: str = _doc("registor output: elastic (1/16 grid) | translation (one vector; the toy task)",
                      "translation")
    registor_scale: float = _doc("gain on the registor output (voxels per unit); 1 = the paper", 8.0)
    registor_pool: str = _doc("omega translation: mean (the spec's global average) | mask (weighted by the mask "
                              "mass each location sees; docs/toy.md#departure-mask-weighted-registor)", "mean")
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
        cls.check_keys(d, source)
        cfg = cls(**d)
        cfg.validate(source)
        return cfg

    @classmethod
    def check_keys(cls, d: dict, source: str = "config") -> None:
        """Unknown keys are errors (a misspelt key would silently keep its default)."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in known:
                close = difflib.get_close_matches(str(key).lower(), known, n=1, cutoff=0.75)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(f"{source}: unknown key {_show(key)} ({hint}known keys: {', '.join(sorted(known))})")

    def validate(self, source: str = "config") -> None:
        def fail(key, expected):
            raise ConfigError(f"{source}: {key}: expected {expected}, got {_show(getattr(self, key))}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            try:  # an int too large for a float is not a usable number either
                return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            except OverflowError:
                return False

        def int_in(key, lo, hi, text):
            v = getattr(self, key)
            if not (is_int(v) and lo <= v <= hi):
                fail(key, text)

        int_in("seed", 0, SEED_LIMIT - 1, "an int in [0, 2**40)")
        for key in ("steps_segmentor", "steps_registor", "steps_joint"):
            int_in(key, 0, STEPS_MAX, f"an int >= 0 (at most {STEPS_MAX:_})")
        int_in("checkpoint_every", 1, STEPS_MAX, f"an int >= 1 (at most {STEPS_MAX:_})")
        int_in("toy_pairs", 1, TOY_PAIRS_MAX, f"an int >= 1 (at most {TOY_PAIRS_MAX:_})")
        if not (is_int(self.spatial_dims) and self.spatial_dims in (2, 3)):
            fail("spatial_dims", "2 or 3")
        if not (isinstance(self.data, str) and (self.data == "toy" or self.data.endswith(".csv"))):
            fail("data", "'toy' or the path of a .csv manifest")
        if self.data == "toy" and self.spatial_dims != 2:
            fail("spatial_dims", "2 with data: toy (the toy pairs are 2-D)")
        if not (is_int(self.toy_size) and 32 <= self.toy_size <= TOY_SIZE_MAX and self.toy_size % CROP_MULTIPLE == 0):
            fail("toy_size", f"an int in [32, {TOY_SIZE_MAX}], a multiple of 16")
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
        if self.steps_joint > 0 and self.lambda_r == self.lambda_g == self.lambda_p == 0:
            # Every gradient of the joint stage would be 0, yet Adam's momentum from the earlier
            # stages would keep moving the weights: a run that claims to train nothing but does.
            raise ConfigError(f"{source}: lambda_r, lambda_g, lambda_p: expected at least one > 0 when "
                              f"steps_joint > 0 (all 0 would still move the weights through Adam's momentum), "
                              f"got {_show(self.lambda_r)}, {_show(self.lambda_g)}, {_show(self.lambda_p)}; "
                              f"set steps_joint: 0 to skip the joint stage")
        for key in ("sim_to_s1", "sim_to_registor", "checkpointing", "bf16", "progress", "inside_only",
                    "unet_coords"):
            if not isinstance(getattr(self, key), bool):
                fail(key, "true or false")
        for key, options in (("norm", NORMS), ("omega", OMEGAS), ("registor_pool", POOLS),
                             ("backend", ck.BACKENDS), ("toy_target", TOY_TARGETS), ("segmentor", SEGMENTORS),
                             ("unet_context", UNET_CONTEXTS)):
            if getattr(self, key) not in options:
                fail(key, "one of " + " | ".join(options))
        int_in("unet_levels", 1, UNET_LEVELS_MAX, f"an int in [1, {UNET_LEVELS_MAX}]")
        if self.segmentor == "unet" and self.spatial_dims != 2:
            fail("segmentor", "genesis with spatial_dims: 3 (the unet segmentor is 2-D)")
        if self.registor_pool != "mean" and self.omega != "translation":
            fail("registor_pool", "mean with omega: elastic (only the translation registor is pooled)")
        if not isinstance(self.genesis, str):
            fail("genesis", "a path or ''")
        if self.genesis and self.spatial_dims != 3:
            fail("genesis", "'' with spatial_dims: 2 (Models Genesis weights are 3-D)")
        if self.genesis and self.segmentor != "genesis":
            fail("genesis", "'' with segmentor: unet (Models Genesis weights fit the genesis segmentor)")
        if self.genesis and self.width != 1:
            raise ConfigError(f"{source}: genesis: Models Genesis weights need width: 1 (their channel counts), "
                              f"got width: {_show(self.width)}")
        if not (isinstance(self.device, str) and DEVICE_PATTERN.fullmatch(self.device)):
            lower = " (lower case)" if isinstance(self.device, str) and DEVICE_PATTERN.fullmatch(
                self.device.lower()) else ""
            fail("device", f"auto | cpu | cuda | cuda:N{lower}")
        lo, hi = self.crop_bounds()
        for key, sides in (("crop_min", lo), ("crop_max", hi)):
            if sides is None:
                fail(key, f"an int or a list of {self.spatial_dims} ints, each a multiple of 16 and >= 16")
        if any(a > b for a, b in zip(lo, hi)):
            fail("crop_min", f"sides <= crop_max {_show(self.crop_max)}")

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


# ----------------------------------------------------------------------------- reading a config file

class _ShortRepr(reprlib.Repr):
    """Values in messages: short (a YAML alias bomb is a list of 10**9 items), and ints too long
    for str() (Python refuses more than 4300 digits) shown by their size."""

    def __init__(self):
        super().__init__()
        self.maxstring, self.maxother, self.maxlong, self.maxlevel, self.maxlist = 400, 120, 40, 2, 4

    def repr_int(self, x, level):
        if x.bit_length() > 512:
            return f"<an int of {int(x.bit_length() * math.log10(2)) + 1} digits>"
        return super().repr_int(x, level)


_show = _ShortRepr().repr


class _Unusable:
    """A YAML number read otherwise than a person means it (YAML 1.1: 0300 is octal, = 192;
    1:30 is base 60, = 90) or too long to convert. It fails every key's check, so the error
    names the key, and its repr says why."""

    def __init__(self, text: str, why: str):
        self.text = text if len(text) <= 24 else text[:12] + "..." + text[-4:]
        self.why = why

    def __repr__(self) -> str:
        return f"{self.text} ({self.why})"


_LOADER = None


def _yaml_loader():
    """yaml.SafeLoader, stricter: a duplicate key is an error naming the key and its lines;
    1e-4, 1E-4, 1e4, +1e-4 are numbers (YAML 1.1 reads a float without a dot as a string);
    octal (0300), base-60 (1:30) and over-long integers become _Unusable."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    import yaml  # lazy on purpose (as everywhere here): only config files need it

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # `<<: *base` then overriding a key is the merge's purpose
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        first = seen.get(key)
                    except TypeError:  # unhashable: SafeLoader reports it
                        continue
                    if first is not None:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {_show(key)} (first on line {first.line + 1})",
                            key_node.start_mark)
                    seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

        def construct_yaml_int(self, node):
            text = str(self.construct_scalar(node))
            body = text.replace("_", "").lstrip("+-")
            if len(body) > 1 and body[0] == "0" and body[1].isdigit():
                return _Unusable(text, f"YAML 1.1 reads a leading 0 as octal, = {int(body, 8)}; "
                                       f"write {int(body)} for decimal")
            if ":" in body:
                return _Unusable(text, f"YAML 1.1 reads a:b as base 60, = {super().construct_yaml_int(node)}")
            if len(body) > 1000:
                return _Unusable(text, f"an integer of {len(body)} digits")
            return super().construct_yaml_int(node)

        def construct_yaml_float(self, node):
            text = str(self.construct_scalar(node))
            if ":" in text:
                return _Unusable(text, f"YAML 1.1 reads a:b as base 60, = {super().construct_yaml_float(node)}")
            return super().construct_yaml_float(node)

    StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)
    StrictLoader.add_constructor("tag:yaml.org,2002:float", StrictLoader.construct_yaml_float)
    StrictLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"), list("-+.0123456789"))
    _LOADER = StrictLoader
    return _LOADER


def _binary_kind(data: bytes) -> str | None:
    """What a file that is not text is (for the message), or None for text."""
    if data.startswith(b"\x1f\x8b"):
        return "a gzip file (a .nii.gz volume?)"
    if data.startswith(b"PK\x03\x04"):
        return "a zip archive (a torch .pt checkpoint?)"
    if data[344:348] in (b"n+1\0", b"ni1\0") or data[4:8] in (b"n+2\0", b"ni2\0"):
        return "a NIfTI volume"
    if data.startswith(b"\x80") and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle (a torch checkpoint?)"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16 text (save it as UTF-8)"
    if b"\0" in data:
        return "a binary file"
    return None


def _read_yaml(path: Path):
    """The YAML document of a config file; every way of not being one is a ConfigError naming the file."""
    import yaml  # lazy on purpose

    try:
        with open(path, "rb") as f:  # bounded: --config /dev/zero or a 2 GB volume must not be read whole
            data = f.read(CONFIG_BYTES_MAX + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc} (expected a YAML config file)") from None
    if len(data) > CONFIG_BYTES_MAX:
        raise ConfigError(f"{path}: not a YAML config: larger than {CONFIG_BYTES_MAX >> 20} MiB (a config is a few kB)")
    kind = _binary_kind(data)
    if kind:
        raise ConfigError(f"{path}: not a YAML config: {kind}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} "
                          f"(save the config as UTF-8)") from None
    try:
        return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = ", ".join(x for x in (exc.context, exc.problem) if x)
        hint = " (use spaces, not tabs)" if "\\t" in what else ""
        raise ConfigError(f"{path}: {where}not valid YAML: {what}{hint}") from None
    except yaml.YAMLError as exc:  # e.g. a control character (ReaderError)
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not a YAML config: nested too deeply") from None


def _resolve_path(config_path: Path, text: str) -> str:
    """A path written in a config file: ~ expanded, relative to the config file's folder, absolute."""
    p = Path(text).expanduser()
    if not p.is_absolute():
        p = Path(os.path.normpath(config_path.expanduser().absolute().parent.resolve() / p))
    return str(p)


def load_config(path) -> Config:
    """Read a YAML config; unknown keys and bad values raise ConfigError naming the key.

    The file must name its data (the `data` key). Relative paths (`data`, `genesis`) are
    relative to the config file's folder and come back absolute, so that the config that a
    run stores (OUT/config.yaml, the checkpoint) works from any working directory; they must
    exist. A `device: cuda:N` must exist on this machine when it has CUDA."""
    path = Path(path)
    d = _read_yaml(path)
    source = str(path)
    if d is None:
        raise ConfigError(f"{source}: empty config: name at least its data (data: toy, or data: manifest.csv); "
                          f"coopseg train --write-config writes every key with its default")
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values (key: value lines), "
                          f"got {type(d).__name__} {_show(d)}")
    Config.check_keys(d, source)
    d = dict(d)
    if isinstance(d.get("data"), str) and d["data"].endswith(".csv"):
        d["data"] = _resolve_path(path, d["data"])
    if isinstance(d.get("genesis"), str) and d["genesis"]:
        d["genesis"] = _resolve_path(path, d["genesis"])
    config = Config.from_dict(d, source=source)  # first what is written, then what is missing
    missing = [k for k in REQUIRED_KEYS if k not in d]
    if missing:
        raise ConfigError(f"{source}: no {missing[0]!r} key: a config names its data (data: toy, or "
                          f"data: manifest.csv); coopseg train --write-config writes every key with its default")
    for key in ("data", "genesis"):
        value = getattr(config, key)
        if not value or (key == "data" and value == "toy"):
            continue
        if not Path(value).exists():
            raise ConfigError(f"{source}: {key}: {value} does not exist")
        if not Path(value).is_file():
            raise ConfigError(f"{source}: {key}: {value} is not a file")
    if config.device.startswith("cuda:") and torch.cuda.is_available() \
            and int(config.device[5:]) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"{source}: device: expected cuda:0 .. cuda:{n - 1} on this machine "
                          f"({n} CUDA device{'s' * (n > 1)}), got {config.device!r}")
    return config


def write_default_config(path) -> None:
    """Write the defaults as YAML, one comment per key, to a new file (never over an existing one)."""
    import yaml  # lazy on purpose

    path = Path(path)
    if path.exists() or path.is_symlink():
        raise ConfigError(f"{path} exists: the default config is only written to a new file "
                          f"(remove it or choose another name)")
    if not path.parent.is_dir():
        why = "is not a folder" if path.parent.exists() else "does not exist"
        raise ConfigError(f"{path}: the folder {path.parent} {why}")
    lines = ["# coopseg training config (coopseg train --config THIS --out DIR). Defaults: the toy task.",
             "# The paper's 3-D liver setting: data: manifest.csv, spatial_dims: 3, width: 1.0, omega: elastic,",
             "# registor_scale: 1.0, lambda_r: 0.1, lambda_g: 1, lambda_p: 1, genesis: Genesis_Chest_CT.pt."]
    for f in dataclasses.fields(Config):
        value = yaml.safe_dump({f.name: getattr(Config(), f.name)}, default_flow_style=True, width=1000).strip()
        lines += [f"# {f.metadata['doc']}", value[1:-1]]
    try:  # "x": created here or not at all (no temporary file to leave behind, nothing overwritten)
        with open(path, "x") as f:
            try:
                f.write("\n".join(lines) + "\n")
            except OSError:
                f.close()
                path.unlink()
                raise
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the config ({exc.strerror or exc})") from None
