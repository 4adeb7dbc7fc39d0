"""The coopseg command line: similarity of NIfTI masks, pairs CSV, Wilcoxon."""
import csv

import nibabel as nib
import numpy as np
import pytest

from coopseg.cli import main
from coopseg.evaluation import paired_wilcoxon


def _save(path, mask, affine=None):
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4) if affine is None else affine), str(path))
    return str(path)


@pytest.fixture
def masks(tmp_path):
    a = np.zeros((20, 22, 18), bool)
    a[5:14, 6:15, 4:12] = True
    b = np.roll(a, (2, -3, 1), axis=(0, 1, 2))  # a translated copy
    return _save(tmp_path / "a.nii.gz", a), _save(tmp_path / "b.nii.gz", b), tmp_path


def test_similarity_of_two_files(masks, capsys):
    a, b, _ = masks
    assert main(["similarity", a, b, "--omega", "translation", "--max-translation", "4"]) == 0
    out = capsys.readouterr().out
    dice = float(out.split("Dice")[1].split()[0])
    ds = float(out.split("D_S")[1].split()[0])
    assert dice < 0.7 and ds == 1.0


def test_translation_default_bound(masks, capsys):
    """--omega translation without --max-translation takes the paper's 32 voxels (it
    crashed on len() of an int)."""
    a, b, _ = masks
    assert main(["similarity", a, b, "--omega", "translation"]) == 0
    out = capsys.readouterr().out
    assert float(out.split("D_S")[1].split()[0]) == 1.0


def test_elastic_default(masks, capsys):
    a, b, _ = masks
    assert main(["similarity", a, b, "--grid-spacing", "8"]) == 0
    ds = float(capsys.readouterr().out.split("D_S")[1].split()[0])
    assert ds > 0.9


def test_shape_mismatch_is_a_clear_error(tmp_path, masks, capsys):
    a, _, _ = masks
    c = _save(tmp_path / "c.nii.gz", np.ones((20, 22, 17), bool))
    assert main(["similarity", a, c]) == 2
    assert "different shapes" in capsys.readouterr().err


def test_missing_file_and_affine_warning(tmp_path, masks, capsys):
    a, b, _ = masks
    assert main(["similarity", a, str(tmp_path / "nope.nii.gz")]) == 2
    assert "nope.nii.gz: no such mask file" in capsys.readouterr().err
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    c = _save(tmp_path / "c.nii.gz", nib.load(b).get_fdata() > 0.5, shifted)
    with pytest.warns(UserWarning, match="different affines"):
        assert main(["similarity", a, c, "--omega", "translation", "--max-translation", "4"]) == 0


def test_non_finite_or_4d_mask_is_a_clear_error(tmp_path, masks, capsys):
    a, _, _ = masks
    bad = np.ones((20, 22, 17), np.float32)
    bad[3, 4, 5] = np.nan
    c = str(tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(bad, np.eye(4)), c)  # float, so the NaN survives
    assert main(["similarity", a, c]) == 2
    err = capsys.readouterr().err
    assert "nan.nii.gz: mask has NaN or infinite voxels" in err and len(err.strip().splitlines()) == 1
    d = _save(tmp_path / "four.nii.gz", np.ones((20, 22, 17, 2), np.float32))
    assert main(["similarity", a, d]) == 2
    assert "expected a 2-D or 3-D mask, got shape (20, 22, 17, 2)" in capsys.readouterr().err


def test_pairs_csv_with_progress(masks, capsys):
    a, b, tmp = masks
    lst = tmp / "pairs.csv"
    lst.write_text("a,b\na.nii.gz,b.nii.gz\nb.nii.gz,b.nii.gz\n")
    out = tmp / "res.csv"
    assert main(["similarity", "--pairs", str(lst), "--out", str(out), "--omega", "translation",
                 "--max-translation", "4"]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["ds"] for r in rows] == ["1.000000", "1.000000"]
    assert float(rows[0]["dice"]) < 0.7 and float(rows[1]["dice"]) == 1.0
    err = capsys.readouterr().err
    assert "2/2" in err and "pair" in err  # tqdm's bar


def test_empty_target_is_not_perfectly_similar(tmp_path, masks, capsys):
    a, _, _ = masks
    e = _save(tmp_path / "e.nii.gz", np.zeros((20, 22, 18), bool))
    for omega in ("translation", "elastic"):
        assert main(["similarity", a, e, "--omega", omega, "--max-translation", "4"]) == 0
        out = capsys.readouterr().out
        assert float(out.split("D_S")[1].split()[0]) == 0.0


def test_max_translation_per_axis(masks, capsys):
    a, b, _ = masks
    assert main(["similarity", a, b, "--omega", "translation", "--max-translation", "4,4,2"]) == 0
    assert float(capsys.readouterr().out.split("D_S")[1].split()[0]) == 1.0


@pytest.mark.parametrize("argv,match", [
    (["--grid-spacing", "0"], "--grid-spacing must be a finite number > 0"),
    (["--grid-spacing", "-3"], "--grid-spacing must be a finite number > 0"),
    (["--grid-spacing", "nan"], "--grid-spacing must be a finite number > 0"),
    (["--grid-spacing", "x"], "--grid-spacing must be a number > 0"),
    (["--max-translation", "-1"], "--max-translation must be an integer >= 0"),
    (["--max-translation", "4,4"], "--max-translation must be one value or 3"),
    (["--iters", "-1"], "--iters must be an integer >= 0"),
    (["--step", "0"], "--step must be a finite number > 0"),
    (["--omega", "affine"], "invalid choice"),
    (["--backend", "triton"], "TRITON_INTERPRET=1"),
    (["--nope"], "unrecognized arguments"),
])
def test_option_errors_are_one_line(masks, capsys, monkeypatch, argv, match):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a user's CPU machine
    a, b, _ = masks
    assert main(["similarity", a, b] + argv) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coopseg: error: ") and match in lines[0], cap.err
    assert "Traceback" not in cap.err and cap.out == ""


@pytest.mark.parametrize("argv,match", [
    (["--pairs", "0"], "--test must be >= 1 and below --pairs (pairs for training remain), got --pairs 0 --test 4"),
    (["--pairs", "4", "--test", "4"], "--test must be >= 1 and below --pairs (pairs for training remain), "
                                      "got --pairs 4 --test 4"),
    (["--test", "0"], "--test must be >= 1 and below --pairs (pairs for training remain), got --pairs 10 --test 0"),
    (["--seed", "-1"], "--seed must be an integer >= 0, got '-1'"),
    (["--pairs", "x"], "--pairs must be an integer >= 0, got 'x'"),
])
def test_demo_data_options_name_the_option(tmp_path, capsys, argv, match):
    """Checked before the templates are read (so also without nilearn)."""
    assert main(["demo-data", str(tmp_path / "d")] + argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"coopseg: error: {match}"] and not (tmp_path / "d").exists()


def test_missing_subcommand_is_one_line(capsys):
    assert main([]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coopseg: error: ")


def test_wilcoxon(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a = rng.uniform(0.9, 1.0, 30)
    b = a - rng.uniform(0.0, 0.02, 30)
    res = paired_wilcoxon(a, b)
    assert res.n == 30 and res.median_difference > 0 and res.p_value < 1e-4
    path = tmp_path / "scores.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ours", "annotations"])
        w.writerows(zip(a, b))
    assert main(["wilcoxon", str(path), "--a", "ours", "--b", "annotations"]) == 0
    assert "p " in capsys.readouterr().out
    assert main(["wilcoxon", str(path), "--a", "ours", "--b", "nope"]) == 2
    with pytest.raises(ValueError, match="all paired differences are zero"):
        paired_wilcoxon(a, a)
