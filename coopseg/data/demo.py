"""Paired two-modality head volumes with brain annotations (``coopseg demo-data OUT``),
built offline from the MNI152 2009a templates that the ``nilearn`` wheel ships
(``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``;
``pip install 'coopseg[demo]'``; nothing is downloaded).

Each pair is one synthetic "subject": the templates are deformed by a random smooth
displacement (a sum of low-frequency sinusoids in world coordinates, a few mm). Then

* modality 1 ("T1") is the T1 template on a 3 mm isotropic grid (slight blur before
  sampling, a smooth multiplicative bias field and Gaussian noise);
* modality 2 ("T2") is synthesised from the tissue maps with another contrast (CSF
  bright, grey matter intermediate, white matter dark, the rest of the head from the T1
  template at lower weight) on its own grid: 3 x 3 mm in plane, **6 mm slices** (slice
  profile blurred along z), tilted 3 degrees about x and with another origin, so the
  pair must be resampled through the affines. Its anatomy is **misaligned** with
  modality 1 by a second random smooth deformation plus a random shift (up to 6 mm per
  axis), as between two acquisitions minutes apart;
* the annotations are brain masks (grey + white matter), made slightly differently per
  modality, as two annotators would: modality 1 thresholds the 1 mm-smoothed
  probability at 0.5, modality 2 the 2 mm-smoothed one at 0.4, each on its own grid.

Written: ``OUT/pair_XX/{t1,t2,t1_mask,t2_mask}.nii.gz``, ``OUT/train.csv`` (the first
``pairs - test`` pairs) and ``OUT/test.csv`` (the last ``test``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import ConfigError, CoopsegError
from .volumes import write_manifest

TEMPLATES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
# modality 1 grid: 3 mm isotropic over the template's head
T1_SPACING, T1_SHAPE, T1_ORIGIN = (3.0, 3.0, 3.0), (64, 76, 62), (-96.0, -132.0, -70.0)
# modality 2 grid: 6 mm slices, tilted, other origin
T2_SPACING, T2_SHAPE, T2_ORIGIN, T2_TILT_DEG = (3.0, 3.0, 6.0), (64, 76, 32), (-94.0, -128.0, -76.0), 3.0


def template_dir() -> Path:
    try:  # lazy on purpose: nilearn is an optional dependency (the "demo" extra), read for its data files
        import nilearn
    except ImportError:
        raise CoopsegError("demo-data needs the MNI152 templates shipped in the nilearn wheel: "
                         "pip install 'coopseg[demo]' (or pip install nilearn)") from None
    d = Path(nilearn.__file__).parent / "datasets" / "data"
    missing = [n for n in TEMPLATES.values() if not (d / n).is_file()]
    if missing:
        raise CoopsegError(f"{d}: the nilearn install lacks {', '.join(missing)}")
    return d


def load_templates() -> tuple[dict, np.ndarray]:
    """(arrays t1 in [0, 1], gm, wm probabilities in [0, 1]; their affine)."""
    import nibabel as nib  # lazy on purpose: nibabel is an optional dependency (the "io"/"demo" extras)

    d = template_dir()
    out, affine = {}, None
    for k, name in TEMPLATES.items():
        img = nib.load(str(d / name))
        out[k] = (np.asarray(img.dataobj, dtype=np.float32) / 255.0).clip(0, 1)
        affine = img.affine
    return out, affine


def grid_affine(spacing, origin, tilt_deg: float = 0.0) -> np.ndarray:
    t = np.deg2rad(tilt_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = origin
    return a


class SmoothField:
    """u(x) = sum_k a_k sin(w_k . x + phi_k) (mm, world coordinates): a random smooth
    displacement, evaluable anywhere; wavelengths 80-160 mm, amplitude ``amplitude``."""

    def __init__(self, rng, amplitude: float, terms: int = 4):
        self.w = rng.normal(size=(terms, 3))
        self.w *= (2 * np.pi / rng.uniform(80, 160, size=(terms, 1))) / np.linalg.norm(self.w, axis=1, keepdims=True)
        self.phi = rng.uniform(0, 2 * np.pi, size=terms)
        self.a = rng.normal(size=(terms, 3)) * amplitude / np.sqrt(terms)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.sin(x @ self.w.T + self.phi) @ self.a


def world_grid(shape, affine) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def sample(volume: np.ndarray, affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinear samples of ``volume`` at world ``points`` (..., 3); 0 outside."""
    from scipy import ndimage  # lazy on purpose: scipy is an optional dependency (the "io"/"demo" extras)

    idx = (points - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    out = ndimage.map_coordinates(volume, np.moveaxis(idx, -1, 0), order=1, mode="constant", cval=0.0)
    return out.astype(np.float32)


def _intracranial(gm, wm):
    """Brain plus the CSF around it: the closed, slightly dilated grey+white matter."""
    from scipy import ndimage  # lazy on purpose (optional dependency)

    brain = (gm + wm) > 0.3
    brain = ndimage.binary_closing(brain, iterations=4)
    return ndimage.binary_fill_holes(ndimage.binary_dilation(brain, iterations=3)).astype(np.float32)


def make_pair(k: int, rng, prepared, template_affine, out: Path) -> dict:
    import nibabel as nib  # lazy on purpose (optional dependency)

    t1_tpl, t2_tpl, mask1_tpl, mask2_tpl = prepared
    subject = SmoothField(rng, amplitude=4.0)
    motion = SmoothField(rng, amplitude=3.0)
    shift = rng.uniform(-6, 6, size=3)

    a1 = grid_affine(T1_SPACING, T1_ORIGIN)
    x = world_grid(T1_SHAPE, a1)
    y = x + subject(x)                                    # the subject's anatomy, read from the template
    t1 = sample(t1_tpl, template_affine, y)
    s1 = sample(mask1_tpl, template_affine, y) > 0.5

    a2 = grid_affine(T2_SPACING, T2_ORIGIN, T2_TILT_DEG)
    x2 = world_grid(T2_SHAPE, a2)
    moved = x2 + motion(x2) + shift                       # the subject moved between the acquisitions
    y2 = moved + subject(moved)
    t2 = sample(t2_tpl, template_affine, y2)
    s2 = sample(mask2_tpl, template_affine, y2) > 0.4

    def finish(img, affine, shape):
        bias = np.exp(0.15 * np.sin(world_grid(shape, affine) @ rng.normal(size=3) / 60 + rng.uniform(0, 6)))
        noisy = img * bias + rng.normal(scale=0.02, size=shape)
        return np.clip(noisy * 1000, 0, None).astype(np.float32)

    folder = out / f"pair_{k:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    row = {"id": folder.name}
    for name, data, affine in (("t1", finish(t1, a1, T1_SHAPE), a1), ("t2", finish(t2, a2, T2_SHAPE), a2),
                               ("t1_mask", s1.astype(np.uint8), a1), ("t2_mask", s2.astype(np.uint8), a2)):
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        row[name] = folder / f"{name}.nii.gz"
        nib.save(img, str(row[name]))
    return row


def make_demo_data(out, *, pairs: int = 10, test: int = 4, seed: int = 0, progress: bool = True) -> tuple[Path, Path]:
    """Write ``pairs`` demo pairs; returns (train.csv, test.csv)."""
    from scipy import ndimage  # lazy on purpose (optional dependency)

    if not (isinstance(pairs, int) and isinstance(test, int) and 1 <= test < pairs):
        raise ConfigError(f"need 1 <= test < pairs, got pairs={pairs!r}, test={test!r}")
    tpl, affine = load_templates()
    gm, wm, t1 = tpl["gm"], tpl["wm"], tpl["t1"]
    icv = _intracranial(gm, wm)
    csf = np.clip(icv - gm - wm, 0, 1)
    # modality 2 contrast: CSF bright, GM intermediate, WM dark, the rest of the head dimmer
    t2 = 0.25 * wm + 0.55 * gm + 0.95 * csf + 0.45 * t1 * (1 - icv)
    brain = gm + wm
    prepared = (ndimage.gaussian_filter(t1, 1.0),
                ndimage.gaussian_filter(t2, (1.0, 1.0, 2.5)),    # 6 mm slice profile along z
                ndimage.gaussian_filter(brain, 1.0),
                ndimage.gaussian_filter(brain, 2.0))
    out = Path(out)
    rng = np.random.default_rng(seed)
    rows = [make_pair(k, rng, prepared, affine, out)
            for k in tqdm(range(pairs), desc="demo-data", unit="pair", disable=not progress)]
    return write_manifest(out / "train.csv", rows[:-test]), write_manifest(out / "test.csv", rows[-test:])
