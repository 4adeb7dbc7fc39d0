"""Datasets of image pairs for training and evaluation.

Protocol: len(ds); ds[i] -> dict(x1, x2, s1, s2) of float32 tensors (1, *S) on ONE
shared grid (x = images in [0, 1], s = masks in {0, 1}). Crops are the training
loop's business.
"""
from __future__ import annotations

from ..errors import ConfigError
from .toy import ToyPairs
from .volumes import PairDataset

TOY_SIZES = {"train": 200, "val": 20, "test": 50}
# Seeds of the toy splits are disjoint blocks: split k of seed s uses s * 10**6 + k * 10**5 + i.
_TOY_SPLIT_OFFSET = {"train": 0, "val": 1, "test": 2}
TOY_PAIRS_MAX = 10**5  # pairs per split: more would run into the next split's block of seeds


def build_dataset(spec, *, spatial_dims: int, seed: int, split: str = "train", n: int | None = None,
                  size: int = 240, max_shift: int | None = None, target: str = "s2"):
    """The dataset named by `spec`:

    "toy"            coopseg.data.toy.ToyPairs (2-D only): `n` pairs (default 200 train,
                     20 val, 50 test) of `size`×`size`, disjoint seeds per split, s2
                     translated by at most `max_shift` px per axis (None: 32 at 240 px);
                     target="oracle": s2 replaced by s1 translated (coopseg.data.toy.make_toy_pair).
    "*.csv"          coopseg.data.volumes.PairDataset(manifest, spatial_dims=..., split=...) (real volumes).
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"data must be 'toy' or the path of a .csv manifest, got {spec!r}")
    if split not in _TOY_SPLIT_OFFSET:
        raise ConfigError(f"split must be one of {', '.join(_TOY_SPLIT_OFFSET)}, got {split!r}")
    if spec == "toy":
        if spatial_dims != 2:
            raise ConfigError(f"the toy data is 2-D: spatial_dims must be 2 for data='toy', got {spatial_dims!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**40:
            raise ConfigError(f"seed must be an int in [0, 2**40), got {seed!r}")
        count = TOY_SIZES[split] if n is None else n
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= TOY_PAIRS_MAX:
            raise ConfigError(f"n must be an int in [1, {TOY_PAIRS_MAX}], got {count!r}")
        return ToyPairs(count, seed=seed * 10**6 + _TOY_SPLIT_OFFSET[split] * 10**5, size=size,
                        max_shift=max_shift, target=target)
    if spec.endswith(".csv"):
        return PairDataset(spec, spatial_dims=spatial_dims, split=split)
    raise ConfigError(f"data must be 'toy' or the path of a .csv manifest, got {spec!r}")
