"""import-chaos under bad or unusual input: slices off one stack along the normal, two series in
one folder, masks named after their slices, and the sweep of odd folders (tags, PNG modes,
labels, patient folders, OUT, links). Synthetic series written with pydicom, as in test_chaos.py."""
import os
import shutil
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, MRImageStorage, generate_uid

from coopseg.cli import main
from coopseg.data.chaos import ChaosError, import_chaos, read_dicom_series
from coopseg.data.volumes import read_manifest

ROWS, COLS, N = 6, 5, 5
PIXEL = (0.8, 1.2)  # PixelSpacing: between rows, between columns
GAP = 3.0


def oblique():
    """Orthonormal row/column directions, tilted about two axes (LPS)."""
    a, b = np.deg2rad(25), np.deg2rad(-15)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    r = rx @ rz
    return r[:, 0], r[:, 1]


ROW, COL = oblique()
NORMAL = np.cross(ROW, COL)
ORIGIN = np.array([-40.0, 12.5, 80.0])


def write_slice(path, ipp, k=0, row=ROW, col=COL, uid="1.2.826.0.1.3680043.8.498.1", echo=4.6, pixels=None,
                rows=ROWS, cols=COLS, spacing=PIXEL, ts=ExplicitVRLittleEndian, **tags):
    """One MR slice file; ``tags`` set (value) or delete (None) DICOM keywords."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    if uid:
        ds.SeriesInstanceUID = uid
    if echo is not None:
        ds.EchoTime = echo
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = list(spacing)
    ds.ImageOrientationPatient = [float(v) for v in np.concatenate([row, col])]
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.SliceThickness = GAP
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2.0, -5.0
    if pixels is None:
        pixels = (100 * k + 10 * np.arange(rows)[:, None] + np.arange(cols)[None, :] + 7).astype(np.uint16)
    ds.PixelData = pixels.tobytes() if ts == ExplicitVRLittleEndian else encapsulate([b"\xff\xd8junk\xff\xd9"])
    for key, value in tags.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def dcm_name(k, reverse=False):
    """CHAOS-like file names; ``reverse``: numbered against the normal (number 1 = last slice)."""
    return f"IMG-0004-{(N - k if reverse else k + 1):05d}.dcm"


def write_stack(folder, reverse=False, offsets=None, **kw):
    """N slices at ORIGIN + k GAP NORMAL (+ offsets[k]); returns {file name: k}."""
    out = {}
    for k in range(N):
        ipp = ORIGIN + k * GAP * NORMAL + (offsets.get(k, 0) if offsets else 0)
        out[write_slice(folder / dcm_name(k, reverse), ipp, k, **kw).name] = k
    return out


def png_slice(k):
    png = np.zeros((ROWS, COLS), np.uint8)
    png[1:4, 1:4] = 63
    png[4, 0:2] = 126
    png[5, k % COLS] = 63   # tells the slices apart
    png[0, k % COLS] = 252
    return png


def write_ground(folder, names_of_k):
    """One PNG per slice k, named names_of_k(k)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(N):
        Image.fromarray(png_slice(k)).save(folder / names_of_k(k))


def liver(k):
    png = png_slice(k)
    return ((png > 55) & (png <= 70)).T


def make_patient(base, pid="1", reverse=False):
    p = base / pid
    write_stack(p / "T1DUAL" / "DICOM_anon" / "InPhase", reverse)
    write_ground(p / "T1DUAL" / "Ground", lambda k: dcm_name(k, reverse).replace(".dcm", ".png"))
    write_stack(p / "T2SPIR" / "DICOM_anon", reverse, uid="1.2.826.0.1.3680043.8.498.2")
    write_ground(p / "T2SPIR" / "Ground", lambda k: dcm_name(k, reverse).replace(".dcm", ".png"))
    return p


@pytest.fixture
def chaos(tmp_path):
    make_patient(tmp_path / "CHAOS" / "MR")
    return tmp_path / "CHAOS"


def t1(chaos, pid="1"):
    return chaos / "MR" / pid / "T1DUAL" / "DICOM_anon" / "InPhase"


def t1_ground(chaos, pid="1"):
    return chaos / "MR" / pid / "T1DUAL" / "Ground"


def cli_error(args, capsys):
    """Runs the CLI, expects exit 2 with one `coopseg: error:` line (tqdm's bar shares stderr)."""
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith("coopseg: error: ") and "Traceback" not in err, err
    return lines[0]


def ras(ipp):
    return np.asarray(ipp, float) * [-1, -1, 1]


# ---- the stack along the normal ---------------------------------------------------------------------------------

def test_written_affine_puts_every_slice_at_its_dicom_position(tmp_path):
    """Every slice's ImagePositionPatient (LPS -> RAS) = affine @ (0, 0, k, 1), in the written sform
    and qform: exactly on a clean oblique series (T2), within 0.1 voxel per axis on one whose
    positions are jittered a little (T1; its affine was sheared, the qform another map than the sform)."""
    make_patient(tmp_path / "in" / "MR")
    rng = np.random.default_rng(0)
    # in-plane up to 0.04 pixel, along the normal up to 0.003 slice (within the 1 % gap rule of old)
    jitter = {k: rng.uniform(-1, 1, 3) * [0.04, 0.04, 0.003] @ np.stack([PIXEL[1] * ROW, PIXEL[0] * COL, GAP * NORMAL])
              for k in range(N)}
    k_of = write_stack(t1(tmp_path / "in"), offsets=jitter)
    import_chaos(tmp_path / "in", tmp_path / "out")
    for name, folder, tol in (("t1", t1(tmp_path / "in"), 0.1),
                              ("t2", tmp_path / "in" / "MR" / "1" / "T2SPIR" / "DICOM_anon", 1e-5)):
        img = nib.load(str(tmp_path / "out" / "1" / f"{name}.nii.gz"))
        sform, qform = img.get_sform(), img.get_qform()
        np.testing.assert_allclose(qform, sform, atol=1e-5)  # orthogonal: the qform holds it exactly
        assert int(img.header["sform_code"]) == int(img.header["qform_code"]) == 1
        data = np.asarray(img.dataobj)
        for f in folder.glob("*.dcm"):
            ds, k = pydicom.dcmread(str(f)), k_of[f.name]
            for affine in (sform, qform):
                # the DICOM position in voxel units of the written grid: (0, 0, k)
                index = np.linalg.solve(affine, np.append(ras(ds.ImagePositionPatient), 1))[:3]
                np.testing.assert_allclose(index, [0, 0, k], atol=tol)
            np.testing.assert_array_equal(data[..., k], ds.pixel_array.T * 2.0 - 5.0)
            if name == "t2":  # pixel (row 5, column 4) at its DICOM world point
                lps = np.array(ds.ImagePositionPatient, float) + 4 * PIXEL[1] * ROW + 5 * PIXEL[0] * COL
                np.testing.assert_allclose((sform @ [4, 5, k, 1])[:3], ras(lps), atol=1e-4)


def test_in_plane_jump_is_refused_naming_the_file(chaos, capsys):
    """A slice whose origin jumps 2 mm in-plane (its position along the normal unchanged) used to be
    accepted, with a sheared affine."""
    folder = t1(chaos)
    bad = write_slice(folder / dcm_name(2), ORIGIN + 2 * GAP * NORMAL + 2.0 * ROW, 2)
    with pytest.raises(ChaosError, match=rf"{bad.name}: ImagePositionPatient .* 2 mm off the line through "
                                         rf"{dcm_name(0)}'s along the slice normal \(tolerance 0.1 pixel"):
        read_dicom_series(folder)
    line = cli_error(["import-chaos", str(chaos), str(chaos.parent / "out")], capsys)
    assert str(bad) in line and "not one stack along the normal" in line
    assert not (chaos.parent / "out").exists()
    # within the tolerance (0.05 pixel): accepted
    write_slice(folder / dcm_name(2), ORIGIN + 2 * GAP * NORMAL + 0.05 * PIXEL[1] * ROW, 2)
    read_dicom_series(folder)


def test_two_series_in_one_folder_are_refused(chaos, capsys):
    """Two interleaved series (positions together evenly spaced, origins 3 mm apart in-plane)
    used to be read as one, with a sheared affine."""
    folder = t1(chaos)
    for f in folder.glob("*.dcm"):
        f.unlink()
    shift = 3.0 * COL
    for k in range(2 * N):
        uid = "1.2.3.4" if k % 2 == 0 else "1.2.3.5"
        write_slice(folder / f"IMG-0004-{k + 1:05d}.dcm", ORIGIN + k * GAP / 2 * NORMAL + (k % 2) * shift, k, uid=uid)
    with pytest.raises(ChaosError, match=r"IMG-0004-00002.dcm: SeriesInstanceUID 1.2.3.5 differs from "
                                         r"IMG-0004-00001.dcm's 1.2.3.4: two series in .*InPhase"):
        read_dicom_series(folder)
    assert "two series in" in cli_error(["import-chaos", str(chaos), str(chaos.parent / "out")], capsys)
    # anonymised: every file its own SeriesInstanceUID -> the geometry tells
    for k in range(2 * N):
        write_slice(folder / f"IMG-0004-{k + 1:05d}.dcm", ORIGIN + k * GAP / 2 * NORMAL + (k % 2) * shift, k,
                    uid=f"1.2.3.{10 + k}")
    with pytest.raises(ChaosError, match=r"IMG-0004-00002.dcm: ImagePositionPatient .* 3 mm off the line"):
        read_dicom_series(folder)
    # ... and one series with a UID per file is fine
    for f in folder.glob("*.dcm"):
        f.unlink()
    for k in range(N):
        write_slice(folder / dcm_name(k), ORIGIN + k * GAP * NORMAL, k, uid=f"1.2.3.{10 + k}")
    assert read_dicom_series(folder)[0].shape == (COLS, ROWS, N)


def test_missing_slice_is_refused_naming_the_file(chaos):
    folder = t1(chaos)
    (folder / dcm_name(2)).unlink()
    write_slice(folder / dcm_name(2), ORIGIN + 5 * GAP * NORMAL, 5)  # 0, 1, 3, 4, 5: a gap after slice 1
    with pytest.raises(ChaosError, match=r"IMG-0004-00004.dcm: 6.000 mm after IMG-0004-00002.dcm along the slice "
                                         r"normal, where the slices of .*InPhase are 3.000 mm apart: unevenly spaced"):
        read_dicom_series(folder)


def test_duplicate_positions_name_both_files(chaos):
    folder = t1(chaos)
    write_slice(folder / "IMG-0004-00099.dcm", ORIGIN + 2 * GAP * NORMAL, 2)
    with pytest.raises(ChaosError, match=r"IMG-0004-00099.dcm: at the position of IMG-0004-00003.dcm along the "
                                         r"slice normal .* two slices at one position"):
        read_dicom_series(folder)


def test_second_echo_in_the_folder_is_named(chaos):
    """OutPhase copied into InPhase: same positions, another EchoTime."""
    for k in range(N):
        write_slice(t1(chaos) / f"IMG-0004-{N + k + 1:05d}.dcm", ORIGIN + k * GAP * NORMAL, k, echo=2.3)
    with pytest.raises(ChaosError, match=r"IMG-0004-00006.dcm: EchoTime 2.3 differs from IMG-0004-00001.dcm's 4.6: "
                                         r"two echoes in"):
        read_dicom_series(t1(chaos))


def test_one_slice_series(chaos):
    folder = t1(chaos)
    for k in range(1, N):
        (folder / dcm_name(k)).unlink()
    volume, affine = read_dicom_series(folder)
    assert volume.shape == (COLS, ROWS, 1)
    np.testing.assert_allclose(affine[:3, 2], ras(GAP * NORMAL), atol=1e-6)  # SliceThickness
    write_slice(folder / dcm_name(0), ORIGIN, 0, SpacingBetweenSlices=4.0)
    np.testing.assert_allclose(read_dicom_series(folder)[1][:3, 2], ras(4.0 * NORMAL), atol=1e-6)
    write_slice(folder / dcm_name(0), ORIGIN, 0, SliceThickness=None)
    with pytest.raises(ChaosError, match=r"IMG-0004-00001.dcm: the only slice of .*InPhase, without a positive "
                                         r"SpacingBetweenSlices or SliceThickness"):
        read_dicom_series(folder)


# ---- masks named after their slices -------------------------------------------------------------------------------

def test_masks_named_after_their_slices_are_matched_by_name(tmp_path):
    """CHAOS names a mask after its DICOM file. With the files numbered against the slice normal,
    the rank matching (k-th PNG by number = k-th slice by position) flipped the masks."""
    make_patient(tmp_path / "in" / "MR", reverse=True)
    import_chaos(tmp_path / "in", tmp_path / "out")
    (case,) = read_manifest(tmp_path / "out" / "manifest.csv")
    for mask in (case.t1_mask, case.t2_mask):
        md = np.asarray(nib.load(str(mask)).dataobj)
        for k in range(N):
            np.testing.assert_array_equal(md[..., k], liver(k))


def test_mask_numbers_against_the_slice_numbers_are_refused(chaos, capsys):
    """Masks named by number only (liver_GT_001.png for IMG-0004-00001.dcm): rank and number must agree."""
    for reverse in (False, True):
        folder, ground = t1(chaos), t1_ground(chaos)
        for f in [*folder.glob("*"), *ground.glob("*")]:
            f.unlink()
        write_stack(folder, reverse)
        write_ground(ground, lambda k: f"liver_GT_{int(dcm_name(k, reverse)[9:14]):03d}.png")
        if not reverse:
            import_chaos(chaos, chaos.parent / "out")
            md = np.asarray(nib.load(str(chaos.parent / "out" / "1" / "t1_mask.nii.gz")).dataobj)
            assert all(np.array_equal(md[..., k], liver(k)) for k in range(N))
    with pytest.raises(ChaosError, match=r"Ground/liver_GT_001.png: matched by rank .* to .*InPhase/IMG-0004-00005.dcm"
                                         r", but its number is that of IMG-0004-00001.dcm: the mask and slice orders"):
        import_chaos(chaos, chaos.parent / "out")
    assert "orders disagree" in cli_error(["import-chaos", str(chaos), str(chaos.parent / "out2")], capsys)


def test_masks_partly_named_after_slices_are_refused(chaos):
    ground = t1_ground(chaos)
    (ground / "IMG-0004-00003.png").rename(ground / "IMG-0004-00099.png")
    with pytest.raises(ChaosError, match=r"IMG-0004-00099.png: no DICOM slice named IMG-0004-00099.dcm in .*InPhase, "
                                         r"while IMG-0004-00001.png is named after one"):
        import_chaos(chaos, chaos.parent / "out")


# ---- the sweep -------------------------------------------------------------------------------------------------

def _del_tag(keyword):
    def mutate(chaos):
        write_slice(t1(chaos) / dcm_name(1), ORIGIN + GAP * NORMAL, 1, **{keyword: None})
    return mutate


def _patch_bytes(old, new, **tags):
    """Slice 1 with ``tags``, then bytes ``old`` of its file replaced by ``new`` (values pydicom would not write)."""
    def mutate(chaos):
        f = write_slice(t1(chaos) / dcm_name(1), ORIGIN + GAP * NORMAL, 1, **tags)
        f.write_bytes(f.read_bytes().replace(old, new))
    return mutate


def _png(array, mode=None, name="IMG-0004-00002.png", palette=None):
    def mutate(chaos):
        img = Image.fromarray(array) if mode is None else Image.fromarray(array, mode)
        if palette is not None:
            img.putpalette(palette)
        img.save(t1_ground(chaos) / name)
    return mutate


def _all_pngs(fn):
    def mutate(chaos):
        for k in range(N):
            Image.fromarray(fn(png_slice(k))).save(t1_ground(chaos) / dcm_name(k).replace(".dcm", ".png"))
    return mutate


def _write(relpath, data):
    def mutate(chaos):
        (chaos / relpath).parent.mkdir(parents=True, exist_ok=True)
        (chaos / relpath).write_bytes(data)
    return mutate


def _slice(**kw):
    def mutate(chaos):
        write_slice(t1(chaos) / dcm_name(1), ORIGIN + GAP * NORMAL, 1, **kw)
    return mutate


def _two_numbered_alike(chaos):
    for k in range(N):
        (t1_ground(chaos) / f"IMG-0004-{k + 1:05d}.png").rename(t1_ground(chaos) / f"m-{k + 1}.png")
    (t1_ground(chaos) / "m-3.png").rename(t1_ground(chaos) / "n-01.png")


def _mkdir(relpath):
    return lambda chaos: (chaos / relpath).mkdir(parents=True)


def _rmtree(relpath):
    return lambda chaos: shutil.rmtree(chaos / relpath)


def _symlink(relpath, target):
    return lambda chaos: os.symlink(target, chaos / relpath)


SIXTEEN = (png_slice(1).astype(np.uint16) * 257)
REFUSED = {
    "no ImagePositionPatient": (_del_tag("ImagePositionPatient"), r"00002.dcm: no ImagePositionPatient tag"),
    "no PixelSpacing": (_del_tag("PixelSpacing"), r"00002.dcm: no PixelSpacing tag"),
    "no ImageOrientationPatient": (_del_tag("ImageOrientationPatient"), r"00002.dcm: no ImageOrientationPatient tag"),
    "no pixel data": (_del_tag("PixelData"), r"00002.dcm: no pixel data"),
    "RescaleSlope xyz": (_patch_bytes(b"7.0", b"xyz", RescaleSlope="7.0"), r"00002.dcm: RescaleSlope 'xyz' is not a"),
    "IPP nan, abc": (_patch_bytes(b"1.5\\2.5\\3.5", b"1.5\\nan\\abc", ImagePositionPatient=["1.5", "2.5", "3.5"]),
                     r"00002.dcm: ImagePositionPatient \['1.5', 'nan', 'abc'\] is not 3 numbers"),
    "IPP nan": (_patch_bytes(b"1.5\\2.5\\3.5", b"1.5\\nan\\3.5", ImagePositionPatient=["1.5", "2.5", "3.5"]),
                r"00002.dcm: ImagePositionPatient \['1.5', 'nan', '3.5'\] is not 3 finite numbers"),
    "PixelSpacing one value": (_slice(PixelSpacing=[0.8]), r"00002.dcm: PixelSpacing \['0.8'\] is not 2 finite"),
    "PixelSpacing 0": (_slice(PixelSpacing=[0.8, 0]), r"00002.dcm: PixelSpacing \[0.8, 0.0\] is not positive"),
    "IOP not orthonormal": (lambda c: [write_slice(t1(c) / dcm_name(k), ORIGIN + k * GAP * NORMAL, k, row=np.array(
        [1.0, 0, 0]), col=np.array([0.3, np.sqrt(1 - 0.09), 0])) for k in range(N)],  # unit, 72.5 degrees apart
                            r"00001.dcm: ImageOrientationPatient .* is not two orthogonal unit vectors"),
    "IOP differs": (_slice(row=np.array([1.0, 0, 0]), col=np.array([0, 1.0, 0])),
                    r"00002.dcm: ImageOrientationPatient .* differs from IMG-0004-00001.dcm's"),
    "RescaleSlope 0": (_slice(RescaleSlope=0), r"00002.dcm: RescaleSlope is 0"),
    "other slice size": (_slice(rows=7, pixels=np.zeros((7, COLS), np.uint16)),
                         r"00002.dcm: slice size \(7, 5\) .* differs from IMG-0004-00001.dcm's \(6, 5\)"),
    "not DICOM": (_write("MR/1/T1DUAL/DICOM_anon/InPhase/IMG-0004-00002.dcm", b"\x89PNG not a dicom"),
                  r"00002.dcm: cannot read as DICOM \(File is missing DICOM File Meta"),
    "empty .dcm": (_write("MR/1/T1DUAL/DICOM_anon/InPhase/IMG-0004-00002.dcm", b""),
                   r"00002.dcm: cannot read as DICOM"),
    "JPEG-LS, no decoder": (_slice(ts=JPEGLSLossless),
                            r"00002.dcm: cannot decode the pixel data \(transfer syntax JPEG-LS Lossless"),
    "truncated pixel data": (_slice(pixels=np.zeros(7, np.uint16)), r"00002.dcm: cannot decode the pixel data"),
    "16-bit PNG x257": (_png(SIXTEEN), r"00002.png: I;16 PNG with grey levels 0..64764; expected the CHAOS 8-bit"),
    "colour PNG": (_png(np.stack([png_slice(1), png_slice(1) * 0, png_slice(1) * 0], -1)),
                   r"00002.png: a colour PNG \(RGB\); expected grey levels"),
    "bilevel PNG": (lambda c: Image.fromarray((png_slice(1) == 63).astype(np.uint8) * 255).convert("1").save(
        t1_ground(c) / "IMG-0004-00002.png"), r"00002.png: grey levels \[1\], none a CHAOS label"),
    "binary 0/1 masks": (_all_pngs(lambda a: (a == 63).astype(np.uint8)), r"00001.png: grey levels \[1\], none"),
    "binary 0/255 masks": (_all_pngs(lambda a: (a == 63).astype(np.uint8) * 255),
                           r"Ground: no liver \(grey levels in \(55, 70\]\) in any mask, but IMG-0004-00001.png holds "
                           r"\[255\]: not the CHAOS labels"),
    "two PNGs numbered alike": (_two_numbered_alike, r"n-01.png: numbered 1 like m-1.png: cannot order"),
    "PNG not a PNG": (_write("MR/1/T1DUAL/Ground/IMG-0004-00002.png", b"GIF89a junk"),
                      r"00002.png: cannot read as PNG"),
    "truncated PNG": (lambda c: (t1_ground(c) / "IMG-0004-00002.png").write_bytes(
        (t1_ground(c) / "IMG-0004-00002.png").read_bytes()[:60]), r"00002.png: cannot read as PNG"),
    "patient without T2SPIR": (_rmtree("MR/1/T2SPIR"), r"MR/1: no T2SPIR folder \(a CHAOS MR patient has T1DUAL"),
    "patient with only T2SPIR": (lambda c: [make_patient(c / "MR", "2"), _rmtree("MR/2/T1DUAL")(c)],
                                 r"MR/2: no T1DUAL folder"),
    "empty numbered folder": (_mkdir("MR/7"), r"MR/7: no T1DUAL or T2SPIR folder"),
    "Ground is a file": (lambda c: [_rmtree("MR/1/T1DUAL/Ground")(c), (t1_ground(c)).write_text("x")],
                         r"T1DUAL/Ground: not a folder"),
    "no InPhase": (_rmtree("MR/1/T1DUAL/DICOM_anon/InPhase"), r"InPhase: no such folder"),
    "empty Ground": (lambda c: [p.unlink() for p in t1_ground(c).glob("*")], r"Ground: 0 PNG masks for 5 DICOM"),
    "patient linked twice": (_symlink("MR/2", "1"), r"MR/2: the same folder as .*MR/1 \(a link\): one patient twice"),
    "numbered link loop": (_symlink("MR/9", "9"), r"MR/9: a numbered entry that is not a folder"),
    "dcm link loop": (_symlink("MR/1/T1DUAL/DICOM_anon/InPhase/loop.dcm", "loop.dcm"),
                      r"loop.dcm: cannot read as DICOM \(.*symbolic links"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_sweep_refused(chaos, case, capsys):
    mutate, message = REFUSED[case]
    mutate(chaos)
    with pytest.raises(ChaosError, match=message):
        import_chaos(chaos, chaos.parent / "out")
    assert not (chaos.parent / "out" / "manifest.csv").exists()
    if case in ("JPEG-LS, no decoder", "colour PNG", "no ImagePositionPatient", "patient with only T2SPIR"):
        cli_error(["import-chaos", str(chaos), str(chaos.parent / "out")], capsys)


ACCEPTED = {
    "macOS ._ files": _write("MR/1/T1DUAL/DICOM_anon/InPhase/._IMG-0004-00002.dcm", b"\x00\x05\x16\x07junk"),
    "macOS ._ PNG": _write("MR/1/T1DUAL/Ground/._IMG-0004-00002.png", b"\x00\x05\x16\x07junk"),
    "upper-case .DCM/.PNG": lambda c: [(t1(c) / dcm_name(1)).rename(t1(c) / "IMG-0004-00002.DCM"),
                                       (t1_ground(c) / "IMG-0004-00002.png").rename(
                                           t1_ground(c) / "IMG-0004-00002.PNG")],
    "a folder named x.dcm": _mkdir("MR/1/T1DUAL/DICOM_anon/InPhase/x.dcm"),
    "16-bit PNG <= 255": _png(png_slice(1).astype(np.uint16)),
    "grey + alpha PNG": _png(np.stack([png_slice(1), np.full((ROWS, COLS), 255, np.uint8)], -1), "LA"),
    "grey RGB PNG": _png(np.stack([png_slice(1)] * 3, -1)),
    "grey palette PNG": _png((png_slice(1) // 63).astype(np.uint8), "P",
                             palette=[v for g in range(256) for v in (min(63 * g, 255),) * 3]),
    "notes folder": _mkdir("MR/notes"),
    "no SeriesInstanceUID/EchoTime": lambda c: [write_slice(t1(c) / dcm_name(k), ORIGIN + k * GAP * NORMAL, k, uid=None,
                                                            echo=None) for k in range(N)],
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_sweep_accepted(chaos, case):
    ACCEPTED[case](chaos)
    import_chaos(chaos, chaos.parent / "out")
    (case_,) = read_manifest(chaos.parent / "out" / "manifest.csv")
    md = np.asarray(nib.load(str(case_.t1_mask)).dataobj)
    assert md.shape == (COLS, ROWS, N)
    for k in range(N):
        np.testing.assert_array_equal(md[..., k], liver(k))


def test_out_inside_the_input(chaos, capsys):
    for out, message in ((chaos / "MR" / "1" / "nifti", r"OUT is inside the input patient folder .*MR/1"),
                         (chaos / "MR", r"OUT is the folder of the patient folders")):
        with pytest.raises(ChaosError, match=message):
            import_chaos(chaos, out)
        assert "write elsewhere" in cli_error(["import-chaos", str(chaos), str(out)], capsys)
    assert not (chaos / "MR" / "1" / "nifti").exists() and not (chaos / "MR" / "manifest.csv").exists()
    import_chaos(chaos, chaos / "nifti")  # inside DIR but beside the patients: fine
    assert read_manifest(chaos / "nifti" / "manifest.csv")[0].id == "1"
    import_chaos(chaos, chaos / "nifti")  # and again (nifti/ is no patient)


def test_out_blocked_before_any_work(chaos):
    out = chaos.parent / "out"
    (out / "manifest.csv").mkdir(parents=True)
    with pytest.raises(ChaosError, match=r"out/manifest.csv: is a folder; cannot write the manifest"):
        import_chaos(chaos, out)
    (out / "manifest.csv").rmdir()
    (out / "1").write_text("x")
    with pytest.raises(ChaosError, match=r"out/1: exists and is not a folder; cannot write patient 1"):
        import_chaos(chaos, out)
    assert sorted(p.name for p in out.iterdir()) == ["1"]


def test_unwritable_out(chaos, capsys):
    out = chaos.parent / "out"
    (out / "1" / "t1.nii.gz").mkdir(parents=True)  # nibabel cannot write there (root or not)
    with pytest.raises(ChaosError, match=r"out/1/t1.nii.gz: cannot write \(Is a directory\)"):
        import_chaos(chaos, out)
    assert "cannot write" in cli_error(["import-chaos", str(chaos), str(out)], capsys)


def test_dir_arguments(chaos, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    for root, message in ((tmp_path / "file", r"file: not a folder"),
                          (tmp_path / "nowhere", r"nowhere: no such folder"),
                          (chaos / "MR" / "1", r"MR/1: one patient's folder; give the folder that holds the patient "
                                                r"folders \(.*MR\)"),
                          (chaos.parent, r"no patient folders \(expected <id>/T1DUAL and <id>/T2SPIR\); give "
                                         r".*/CHAOS\?"),
                          (chaos / "MR" / "1" / "T1DUAL", r"T1DUAL: no patient folders \(expected <id>/T1DUAL and "
                                                          r"<id>/T2SPIR\)$")):
        with pytest.raises(ChaosError, match=message):
            import_chaos(root, tmp_path / "out")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # not installed
    assert "pip install 'coopseg[io]'" in cli_error(["import-chaos", str(chaos), str(tmp_path / "out")], capsys)
