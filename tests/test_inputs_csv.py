"""Bad and unusual input to the table-reading verbs (similarity, wilcoxon, evaluate) and to
the CSV files they read (pairs lists, manifests, score tables): one line `coopseg: error:`
naming the file / line / column / option, exit status 2, checked before any work; never a
traceback or a silently wrong number."""
import csv
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import coopseg.cli.similarity as sim
from coopseg import evaluation, infer
from coopseg.cli import main
from coopseg.data import tables
from coopseg.data.volumes import PairDataset, VolumeError, read_manifest, write_manifest
from coopseg.evaluation import paired_wilcoxon, read_paired_scores

sys.path.insert(0, str(Path(__file__).parent))
from test_infer import Pointwise  # noqa: E402
from test_volumes import A1, A2, CENTRE, S1, S2, ball, save, world  # noqa: E402


def one_line_error(capsys, argv, *match):
    """Run the CLI; it must exit 2 with one `coopseg: error:` line holding every `match`."""
    assert main([str(a) for a in argv]) == 2
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("coopseg: error: ")]
    assert len(lines) == 1, cap.err
    for m in match:
        assert str(m) in lines[0], (m, lines[0])
    return lines[0]


def mask_file(path, mask, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(mask, np.uint8), np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture
def masks(tmp_path):
    a = np.zeros((12, 12, 10), bool)
    a[3:8, 3:8, 2:7] = True
    mask_file(tmp_path / "a.nii.gz", a)
    mask_file(tmp_path / "b.nii.gz", np.roll(a, 1, axis=0))
    return tmp_path


SIM = ["--omega", "translation", "--max-translation", "2"]  # fast and exact


@pytest.fixture
def cases(tmp_path):
    """Four annotated pairs (T1 on A1/S1, T2 on the oblique A2/S2) and their manifest."""
    w1, w2 = world(S1, A1), world(S2, A2)
    rows = []
    for k, off in enumerate((2.0, -1.5, 3.0, 1.0)):
        c1, c2 = CENTRE + [0.3 * k, 0, 0], CENTRE + [off, 0, 0]
        rows.append({})
        for name, w, c, aff, r in (("t1", w1, c1, A1, 9.0), ("t2", w2, c2, A2, 9.0),
                                   ("t1_mask", w1, c1, A1, 9.5), ("t2_mask", w2, c2, A2, 8.5)):
            rows[-1][name] = save(tmp_path / f"{name}_{k}.nii.gz", (ball(w, c, r) * 100).astype(np.float32)
                                  if "mask" not in name else ball(w, c, r), aff)
        rows[-1]["id"] = f"case{k}"
    return tmp_path, write_manifest(tmp_path / "test.csv", rows)


@pytest.fixture
def fake_checkpoint(monkeypatch, tmp_path):
    """`--checkpoint` resolves to test_infer's Pointwise network (images that are their masks
    are predicted as their masks)."""
    ckpt = tmp_path / "fake.pt"
    ckpt.write_bytes(b"")

    class Config:
        omega, crop_max = "elastic", 16

    for module in (infer, evaluation):
        monkeypatch.setattr(module, "load_checkpoint_model", lambda path, device="cpu": (Pointwise(), Config()))
    return ckpt


@pytest.fixture
def no_compute(monkeypatch):
    """evaluate must fail before it loads (let alone computes) any case."""
    def load_pair(*a, **k):
        raise AssertionError("a case was loaded before the input error was reported")
    monkeypatch.setattr(evaluation, "load_pair", load_pair)


def evaluate_argv(manifest, ckpt, out, *extra):
    return ["evaluate", "--manifest", manifest, "--checkpoint", ckpt, "--out", out, "--patch", "16",
            "--grid-spacing", "8", "--iters", "5", *extra]


# ----------------------------------------------------------------------------- evaluate -> wilcoxon

def test_wilcoxon_on_the_csv_evaluate_writes_counts_the_cases_only(cases, fake_checkpoint, capsys):
    """4 pairs are n 4: the per-case CSV holds the cases and nothing else (the mean is in
    .mean.csv); the test equals paired_wilcoxon of the 4 rows."""
    tmp, manifest = cases
    out = tmp / "res" / "results.csv"
    assert main([str(a) for a in evaluate_argv(manifest, fake_checkpoint, out)]) == 0
    assert "mean: " in capsys.readouterr().out
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["case0", "case1", "case2", "case3"]
    with open(out.with_suffix(".mean.csv")) as f:
        (mean,) = list(csv.DictReader(f))
    assert mean["summary"] == "mean" and mean["n"] == "4"
    assert float(mean["ds_ann"]) == pytest.approx(np.mean([float(r["ds_ann"]) for r in rows]), abs=2e-6)
    assert main(["wilcoxon", str(out), "--a", "ds_pred", "--b", "ds_ann"]) == 0
    printed = capsys.readouterr().out
    res = paired_wilcoxon([float(r["ds_pred"]) for r in rows], [float(r["ds_ann"]) for r in rows])
    assert printed.startswith("n 4") and f"p {res.p_value:.4g}" in printed
    # the summary file is not a table of cases
    one_line_error(capsys, ["wilcoxon", out.with_suffix(".mean.csv"), "--a", "ds_pred", "--b", "ds_ann"],
                   "results.mean.csv: a summary table")


def _old_evaluate_csv(path, ours, theirs, last="mean"):
    """A per-case CSV as evaluate wrote it before: the cases, then a `mean` row."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "ds_pred", "ds_ann"])
        for k, (x, y) in enumerate(zip(ours, theirs)):
            w.writerow([f"pair_{k}", f"{x:.6f}", f"{y:.6f}"])
        w.writerow([last, f"{np.mean(ours):.6f}", f"{np.mean(theirs):.6f}"])
    return path


def test_wilcoxon_skips_the_mean_row_of_an_old_evaluate_csv(tmp_path, capsys):
    """The issue's numbers: 4 pairs, all better: n 4, p 0.125 (not n 5, p 0.0625)."""
    ours, theirs = [0.986198, 0.987190, 0.987808, 0.989053], [0.971459, 0.970899, 0.971977, 0.971823]
    path = _old_evaluate_csv(tmp_path / "old.csv", ours, theirs)
    assert main(["wilcoxon", str(path), "--a", "ds_pred", "--b", "ds_ann"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("n 4  ") and "p 0.125" in cap.out
    assert "old.csv, line 6 (case 'mean') holds the means of the rows above" in cap.err


@pytest.mark.parametrize("text, match", [
    ("case,a,b\nx,1,2\ny,3,1\nz,2,0.5\nstd,0.8,0.6\n", "line 5, column 'case': 'std' names a summary row"),
    ("case,a,b\nx,1,2\ny,3,1\nz,2,0.5\nTotal,6,3.5\n", "'Total' names a summary row"),
    ("case,a,b\nx,1,2\ny,3,1\nz,2,0.5\nmean,9,9\n", "'mean' names a summary row"),  # not the means: refused
    ("case,a,b\nx,1,2\ny,3,1\nx,2,0.5\n", "case id 'x' appears twice (lines 2 and 4)"),
    ("id,a,b\nx,1,2\ny,3,1\nx,2,0.5\n", "case id 'x' appears twice"),
    ("case,a,b\nx,1,2\ny,,1\n", "line 3, column 'a': empty cell"),
    ("case,a,b\nx,1,2\ny,0.9x,1\n", "line 3, column 'a': '0.9x' is not a number"),
    ("case,a,b\nx,1,2\ny,1,nan\n", "line 3, column 'b': 'nan' is not a finite number"),
    ("case,a,b\nx,1,2\ny,1,-inf\n", "'-inf' is not a finite number"),
    ("case,a,b\nx,1,2\ncase,a,b\ny,3,1\n", "line 3, column 'a': 'a' is not a number"),  # two files concatenated
    ("case,a,b\nx,1,2\ny,95%,1\n", "line 3, column 'a': '95%' is not a number"),
    ("case,a,b\n", "has no rows (only a header)"),
    ("", "is empty"),
    ("case,a,a\nx,1,2\ny,3,1\n", "column 'a' appears twice in the header"),
    ("a,b\n1,2,3\n2,1\n3,1\n", "line 2: 3 cells, but the header (line 1) names 2 columns"),
    ("a;b\n1;2\n2;1\n", "columns must be separated by commas"),
])
def test_wilcoxon_names_the_file_line_and_column(tmp_path, capsys, text, match):
    path = tmp_path / "scores.csv"
    path.write_text(text)
    one_line_error(capsys, ["wilcoxon", path, "--a", "a", "--b", "b"], "scores.csv", match)


def test_wilcoxon_ids_columns_and_zero_differences(tmp_path, capsys):
    path = tmp_path / "s.csv"
    path.write_text("name, ours ,theirs\nx,1,0.5\ny,2,1\nx,3,3\nw,4,2\n")  # spaces around a header name
    one_line_error(capsys, ["wilcoxon", path, "--a", "ours", "--b", "theirs", "--id", "name"],
                   "case id 'x' appears twice")
    one_line_error(capsys, ["wilcoxon", path, "--a", "ours", "--b", "ours"], "the two score columns are the same")
    one_line_error(capsys, ["wilcoxon", path, "--a", "ours", "--b", "nope"], "no column 'nope'", "'theirs'")
    one_line_error(capsys, ["wilcoxon", path, "--a", "ours", "--b", "theirs", "--id", "nope"], "no column 'nope'")
    assert main(["wilcoxon", str(path), "--a", " ours", "--b", "theirs"]) == 0  # no id column: no check
    assert capsys.readouterr().out.startswith("n 4 (1 zero difference dropped by the test)  median(ours - theirs)")
    # a last row that is the mean of the others, unnamed: counted, with a note
    path.write_text("ours,theirs\n1,0.5\n2,1.5\n3,1\n2,1\n")
    assert main(["wilcoxon", str(path), "--a", "ours", "--b", "theirs"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("n 4") and "line 5 equals the mean of the rows above" in cap.err
    scores = read_paired_scores(path, "ours", "theirs")
    assert scores.a == [1, 2, 3, 2] and scores.b == [0.5, 1.5, 1, 1]


# ----------------------------------------------------------------------------- manifests

def test_duplicate_manifest_rows_are_refused(cases, fake_checkpoint, capsys, no_compute):
    tmp, manifest = cases
    lines = manifest.read_text().splitlines()
    # row 3 names row 1's pair through another spelling of the same paths
    t1, t2 = (tmp / "t1_0.nii.gz"), (tmp / "./sub/../t2_0.nii.gz")
    (tmp / "sub").mkdir()
    dup = tmp / "dup.csv"
    dup.write_text("\n".join(lines[:3] + [f"again,{t1},{t2},,"] + lines[3:]) + "\n")
    with pytest.raises(VolumeError, match=r"dup.csv, line 4: the same pair .* as line 2"):
        read_manifest(dup)
    one_line_error(capsys, evaluate_argv(dup, fake_checkpoint, tmp / "r.csv"), "dup.csv, line 4: the same pair")
    ids = tmp / "ids.csv"
    ids.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2].replace("case1", "case0") + "\n")
    with pytest.raises(VolumeError, match=r"ids.csv, line 3: id 'case0' already used on line 2"):
        read_manifest(ids)
    with pytest.raises(VolumeError, match="the same pair"):
        PairDataset(dup)  # training would weigh the pair twice


def test_manifest_with_bom_crlf_spaces_and_relative_paths_from_another_cwd(cases, tmp_path, monkeypatch):
    tmp, manifest = cases
    text = manifest.read_text().splitlines()
    header = " , ".join(c for c in text[0].split(","))  # ' id , t1 , ...': spaces around names
    bom = tmp / "excel.csv"
    bom.write_bytes(("\r\n".join([header] + text[1:] + ["", ",,,,"]) + "\r\n").encode("utf-8-sig"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    got = read_manifest(os.path.relpath(bom, elsewhere))
    want = read_manifest(manifest)
    assert [c.id for c in got] == ["case0", "case1", "case2", "case3"]
    assert [os.path.realpath(c.t2_mask) for c in got] == [os.path.realpath(c.t2_mask) for c in want]
    assert all(c.t1.is_file() for c in got)


@pytest.mark.parametrize("content, match", [
    (b"id,t1,t2,t1_mask,t2_mask\n", "manifest has no rows (only a header)"),
    (b"\n\n  \n", "the manifest is empty"),
    (bytes(range(256)), "a binary file, not a CSV manifest"),
    ("id,t1,t2\nx,\u00e9.nii,b.nii\n".encode("latin-1"), "not UTF-8 text (byte 0xe9"),
    ("t1,t2\na,b\n".encode("utf-16"), "UTF-16 text"),
    (b"t1;t2;t1_mask;t2_mask\na;b;c;d\n", "columns must be separated by commas"),
    (b"t1,t2\n,b.nii.gz\n", "line 2: a manifest row needs both t1 and t2 paths"),
])
def test_bad_manifest_files_name_the_file(tmp_path, capsys, fake_checkpoint, no_compute, content, match):
    path = tmp_path / "m.csv"
    path.write_bytes(content)
    with pytest.raises(VolumeError, match=re.escape(match)):
        read_manifest(path)
    one_line_error(capsys, evaluate_argv(path, fake_checkpoint, tmp_path / "r.csv"), "m.csv", match)


def test_nifti_or_folder_as_manifest_or_pairs_list(masks, capsys, fake_checkpoint, no_compute):
    tmp = masks
    nii = tmp / "plain.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(nii))
    for path, match in ((tmp / "a.nii.gz", "a gzip-compressed file (a .nii.gz image?), not a CSV manifest"),
                        (nii, "plain.nii: a NIfTI image, not a CSV manifest"), (tmp, "is a folder, not a CSV")):
        one_line_error(capsys, evaluate_argv(path, fake_checkpoint, tmp / "r.csv"), match)
        one_line_error(capsys, ["similarity", "--pairs", path], match.replace("manifest", "pairs list"))
        one_line_error(capsys, ["wilcoxon", path, "--a", "x", "--b", "y"],
                       match.replace("manifest", "score table"))


def test_huge_table_is_refused_before_reading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tables, "MAX_BYTES", 1000)
    path = tmp_path / "big.csv"
    path.write_text("a,b\n" + "1,2\n" * 400)
    one_line_error(capsys, ["wilcoxon", path, "--a", "a", "--b", "b"], "big.csv", "too large for a CSV score table")


# ----------------------------------------------------------------------------- evaluate: checked before any case

@pytest.mark.parametrize("extra, match", [
    (["--iters", "-1"], "--iters must be an integer >= 0, got '-1'"),
    (["--iters", "3.5"], "--iters must be an integer >= 0"),
    (["--grid-spacing", "0"], "--grid-spacing must be a finite number > 0"),
    (["--grid-spacing", "0.01"], "--grid-spacing must be >= 1"),
    (["--grid-spacing", "inf"], "--grid-spacing must be a finite number > 0"),
    (["--overlap", "1"], "--overlap must be a number in [0, 1), got '1'"),
    (["--overlap", "nan"], "--overlap must be a number in [0, 1)"),
    (["--patch", "20"], "--patch must be 3 positive multiples of 16"),
])
def test_evaluate_options_are_checked_before_the_first_case(cases, fake_checkpoint, capsys, no_compute, extra,
                                                             match):
    tmp, manifest = cases
    one_line_error(capsys, evaluate_argv(manifest, fake_checkpoint, tmp / "r.csv", *extra), match)


def test_evaluate_checks_every_case_file_before_the_first(cases, fake_checkpoint, capsys, no_compute):
    tmp, manifest = cases
    rows = list(csv.DictReader(open(manifest)))
    last = rows[-1]
    for col, bad, match in (("t2_mask", "nope.nii.gz", "nope.nii.gz: no such mask file"),
                            ("t1_mask", "sub", "sub: is a folder, not a mask file"),
                            ("t2_mask", "t1_mask_0.nii.gz", "mask shape (21, 17, 13) does not match its image"),
                            ("t2", "test.csv", "test.csv: cannot read as NIfTI"),
                            ("t1_mask", "", "no mask given")):
        (tmp / "sub").mkdir(exist_ok=True)
        m = tmp / "m.csv"
        with open(m, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows[:-1] + [{**last, col: bad}])
        one_line_error(capsys, evaluate_argv(m, fake_checkpoint, tmp / "r.csv"), match)


def test_mask_too_small_for_ds_names_the_file(masks, capsys, fake_checkpoint, no_compute):
    tmp = masks
    thin = mask_file(tmp / "thin.nii.gz", np.ones((1, 12, 10)))
    one_line_error(capsys, ["similarity", thin, thin], "thin.nii.gz: mask shape (1, 12, 10) is too small for D_S")
    (tmp / "p.csv").write_text("a,b\na.nii.gz,b.nii.gz\nthin.nii.gz,thin.nii.gz\n")
    one_line_error(capsys, ["similarity", "--pairs", tmp / "p.csv", "--out", tmp / "r.csv"] + SIM,
                   "thin.nii.gz: mask shape (1, 12, 10) is too small for D_S")
    assert not (tmp / "r.csv").exists()  # no partial result table
    # evaluate: D_S runs on the T1 grid; a 1-voxel-thick T1 volume is named
    img = tmp / "slab.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((12, 12, 1), np.float32), np.eye(4)), str(img))
    m = write_manifest(tmp / "m.csv", [dict(t1=img, t2=tmp / "a.nii.gz", t1_mask=img, t2_mask=tmp / "a.nii.gz")])
    one_line_error(capsys, evaluate_argv(m, fake_checkpoint, tmp / "r.csv"),
                   "slab.nii.gz: shape (12, 12, 1) is too small for D_S")


# ----------------------------------------------------------------------------- --out, checked before the work

def _out_cases(tmp):
    (tmp / "afile").write_text("x")
    (tmp / "adir").mkdir()
    return [(tmp / "adir", "is a folder"), (tmp / "afile" / "r.csv", "afile is a file, not a folder"),
            (tmp / "afile" / "deeper" / "r.csv", "afile is a file, not a folder")]


def test_similarity_out_is_checked_before_the_work(masks, capsys, monkeypatch):
    tmp = masks
    (tmp / "p.csv").write_text("a,b\na.nii.gz,b.nii.gz\n")
    monkeypatch.setattr(sim, "compare", lambda *a: pytest.fail("computed before --out was checked"))
    for out, match in _out_cases(tmp) + [(tmp / "p.csv", "is also an input of this run"),
                                         (tmp / "a.nii.gz", "is also an input of this run")]:
        one_line_error(capsys, ["similarity", "--pairs", tmp / "p.csv", "--out", out], "--out", match)
    one_line_error(capsys, ["similarity", tmp / "a.nii.gz", tmp / "b.nii.gz", "--out", tmp / "r.csv"],
                   "--out is for --pairs")
    monkeypatch.undo()
    out = tmp / "new" / "deeper" / "r.csv"  # a missing parent is created
    assert main(["similarity", "--pairs", str(tmp / "p.csv"), "--out", str(out)] + SIM) == 0
    assert list(csv.DictReader(open(out)))[0]["ds"] == "1.000000"
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.csv"]  # no temporary file left


def test_evaluate_out_is_checked_before_the_work(cases, fake_checkpoint, capsys, no_compute):
    tmp, manifest = cases
    for out, match in _out_cases(tmp) + [(manifest, "is also an input of this run"),
                                         (fake_checkpoint, "is also an input of this run"),
                                         (tmp / "r.txt", "the table would be written over the per-case CSV"),
                                         (tmp / "r.png", "the figure would be written over the per-case CSV")]:
        one_line_error(capsys, evaluate_argv(manifest, fake_checkpoint, out), "--out", match)
    (tmp / "r.mean.csv").mkdir()  # a folder in the way of a file written beside the CSV
    one_line_error(capsys, evaluate_argv(manifest, fake_checkpoint, tmp / "r.csv"), "r.mean.csv: is a folder")


def test_import_chaos_out_is_checked_first(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        one_line_error(capsys, ["import-chaos", tmp_path / "no-such-dir", out], "OUT", "afile exists and is not a")


# ----------------------------------------------------------------------------- similarity options and pairs lists

@pytest.mark.parametrize("argv, match", [
    (["--step", "1e300"], "--step must be at most 3.403e+38"),
    (["--step", "1e39"], "--step must be at most"),
    (["--grid-spacing", "0.001"], "--grid-spacing must be >= 1"),
    (["--grid-spacing", "1e-300"], "--grid-spacing must be >= 1"),
])
def test_similarity_numbers_that_overflow_are_one_line(masks, capsys, argv, match):
    one_line_error(capsys, ["similarity", masks / "a.nii.gz", masks / "b.nii.gz"] + argv, match)


@pytest.mark.parametrize("text, match", [
    ("a,b\n", "pairs list has no rows (only a header)"),
    ("a,b\na.nii.gz,\n", "line 2: needs two mask paths"),
    ("a.nii.gz\n", "line 1: needs two mask paths"),
    ("a,b\na.nii.gz,b.nii.gz\nb.nii.gz,a.nii.gz\n./a.nii.gz,sub/../b.nii.gz\n",
     "line 4: the same pair as line 2"),
    ("a,b\nsub,b.nii.gz\n", "line 2: " + "{tmp}/sub is a folder, not a mask file"),
    ("t1,t2\na.nii.gz,b.nii.gz\n", "line 1: {tmp}/t1: no such mask file (a header row needs the columns a and b)"),
    ("a,b\na.nii.gz,b.nii.gz\nnope.nii.gz,b.nii.gz\n", "line 3: {tmp}/nope.nii.gz: no such mask file"),
])
def test_bad_pairs_lists_are_refused_before_any_pair(masks, capsys, text, match):
    tmp = masks
    (tmp / "sub").mkdir()
    (tmp / "p.csv").write_text(text)
    one_line_error(capsys, ["similarity", "--pairs", tmp / "p.csv"] + SIM, "p.csv", match.format(tmp=tmp))


def test_pairs_list_bom_crlf_tilde_and_another_cwd(masks, capsys, monkeypatch, tmp_path):
    tmp = masks
    monkeypatch.setenv("HOME", str(tmp))
    (tmp / "p.csv").write_bytes("\ufeffa , b\r\na.nii.gz,~/b.nii.gz\r\n\r\nb.nii.gz , b.nii.gz\r\n".encode())
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    out = other / "r.csv"
    assert main(["similarity", "--pairs", os.path.relpath(tmp / "p.csv"), "--out", str(out)] + SIM) == 0
    rows = list(csv.DictReader(open(out)))
    assert [Path(r["b"]).name for r in rows] == ["b.nii.gz", "b.nii.gz"]
    assert [r["ds"] for r in rows] == ["1.000000", "1.000000"] and rows[1]["dice"] == "1.000000"
    # Old Mac line endings (\r only)
    (tmp / "q.csv").write_bytes(b"a,b\ra.nii.gz,b.nii.gz\r")
    assert main(["similarity", "--pairs", str(tmp / "q.csv")] + SIM) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith("b.nii.gz,0.800000,1.000000")


def test_a_failed_pair_leaves_no_partial_results(masks, capsys):
    """A pair that fails late (a NaN voxel is only seen when read) exits 2 and --out keeps
    what it held: a partial table would look like a result."""
    tmp = masks
    bad = np.zeros((12, 12, 10), np.float32)
    bad[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(bad, np.eye(4)), str(tmp / "nan.nii.gz"))
    (tmp / "p.csv").write_text("a,b\na.nii.gz,b.nii.gz\nnan.nii.gz,b.nii.gz\n")
    out = tmp / "r.csv"
    out.write_text("previous results\n")
    one_line_error(capsys, ["similarity", "--pairs", tmp / "p.csv", "--out", out] + SIM,
                   "nan.nii.gz: mask has NaN or infinite voxels")
    assert out.read_text() == "previous results\n" and sorted(os.listdir(tmp)).count("r.csv") == 1
    assert not [p for p in os.listdir(tmp) if p.endswith(".tmp")]


def test_folder_as_a_mask(masks, capsys):
    one_line_error(capsys, ["similarity", masks, masks / "b.nii.gz"], "is a folder, not a mask file")


def test_dataset_2d_with_a_non_nifti_image_names_it(cases):
    tmp, manifest = cases
    rows = list(csv.DictReader(open(manifest)))
    m = tmp / "m.csv"
    with open(m, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerow({**rows[0], "t1": "test.csv"})
    with pytest.raises(VolumeError, match="test.csv: cannot read as NIfTI"):
        PairDataset(m, spatial_dims=2)


def test_truncated_nifti_and_empty_names_are_one_line(masks, capsys):
    data = (masks / "r.nii")
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((12, 12, 10)).astype(np.float32), np.eye(4)), str(data))
    raw = data.read_bytes()
    (masks / "cut.nii").write_bytes(raw[:len(raw) // 2])  # nibabel's message has a newline
    one_line_error(capsys, ["similarity", masks / "cut.nii", masks / "a.nii.gz"], "cut.nii: cannot read as NIfTI")
    one_line_error(capsys, ["similarity", "--pairs", masks / "p.csv", "--out", ""], "--out: empty path")
    (masks / "s.csv").write_text(",case,ours\n0,x,1\n1,y,2\n")  # pandas' unnamed index column
    one_line_error(capsys, ["wilcoxon", masks / "s.csv", "--a", "", "--b", "ours"], "--a: empty column name")


def test_stdout_reader_that_stops_is_no_traceback(masks):
    (masks / "p.csv").write_text("a,b\na.nii.gz,b.nii.gz\nb.nii.gz,a.nii.gz\na.nii.gz,a.nii.gz\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    p = subprocess.Popen([sys.executable, "-m", "coopseg", "similarity", "--pairs", str(masks / "p.csv")] + SIM,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # `| head -0`: the reader is gone before the first row (no race)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 1 and "Traceback" not in err and "Error" not in err, err


def test_out_through_a_link_or_to_a_device(masks, capsys):
    """The atomic write replaces a link's target (not the link) and writes devices directly."""
    tmp = masks
    (tmp / "p.csv").write_text("a,b\na.nii.gz,b.nii.gz\n")
    (tmp / "store").mkdir()
    (tmp / "store" / "r.csv").write_text("old\n")
    (tmp / "link.csv").symlink_to(tmp / "store" / "r.csv")
    assert main(["similarity", "--pairs", str(tmp / "p.csv"), "--out", str(tmp / "link.csv")] + SIM) == 0
    assert (tmp / "link.csv").is_symlink() and (tmp / "store" / "r.csv").read_text().startswith("a,b,dice,ds")
    assert main(["similarity", "--pairs", str(tmp / "p.csv"), "--out", os.devnull] + SIM) == 0
    assert Path(os.devnull).is_char_device()


def test_a_table_from_a_pipe(tmp_path, capsys):
    """`coopseg wilcoxon <(make-scores)`: a named pipe is read like a file."""
    fifo = tmp_path / "scores"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "w") as f:
            f.write("case,x,y\np1,1,2\np2,3,1\np3,5,2\n")

    t = threading.Thread(target=feed)
    t.start()
    assert main(["wilcoxon", str(fifo), "--a", "x", "--b", "y"]) == 0
    t.join(timeout=10)
    assert capsys.readouterr().out.startswith("n 3  median(x - y) +2.0000")
