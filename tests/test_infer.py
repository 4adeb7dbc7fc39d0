"""Whole-volume prediction and the evaluation table, with stand-in networks whose
outputs are known, on a pair with different affines."""
import csv
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import coopseg_kernels as ck
from coopseg import evaluation as evaluate_cases  # the §3.2.3 evaluation (was coopseg/evaluate_cases.py)
from coopseg import infer
from coopseg.cli import main
from coopseg.data.volumes import load_pair, read_manifest, resample, write_manifest
from coopseg.evaluation import paired_wilcoxon

sys.path.insert(0, str(Path(__file__).parent))
from test_volumes import A1, A2, CENTRE, S1, S2, ball, save, world  # noqa: E402

SHIFT = (1.0, -2.0, 0.3)  # the stand-in registor's displacement, voxels (not .5: no ties at 0.5)


class Pointwise(torch.nn.Module):
    """Logits = 20 (x - 0.5) per modality; a constant displacement field."""
    spatial_dims = 3

    def forward(self, x1, x2):
        coarse = torch.tensor(SHIFT).view(1, 3, 1, 1, 1).expand(x1.shape[0], 3, *[s // 16 for s in x1.shape[2:]])
        return 20 * (x1 - 0.5), 20 * (x2 - 0.5), coarse.contiguous()


class WindowMean(torch.nn.Module):
    """Logits = the window's mean of x1 (constant over the window): blending is visible."""
    spatial_dims = 3

    def forward(self, x1, x2):
        m = x1.mean(dim=(2, 3, 4), keepdim=True).expand_as(x1)
        coarse = torch.zeros(x1.shape[0], 3, *[s // 16 for s in x1.shape[2:]])
        return 8 * m - 2, -8 * m + 1, coarse


def test_gaussian_importance_and_window_starts():
    w = infer.gaussian_importance((16, 32))
    assert w.shape == (16, 32) and float(w.max()) == pytest.approx(1.0, abs=1e-3) and float(w.min()) > 0
    torch.testing.assert_close(w, w.flip(0).flip(1))
    assert float(w[0, 16]) < 0.01 < float(w[8, 16])
    for size, patch, overlap in ((100, 32, 0.5), (33, 32, 0.5), (32, 32, 0.5), (70, 16, 0.25), (5, 16, 0.5)):
        s = infer.window_starts(size, patch, overlap)
        assert s[0] == 0 and s[-1] == max(size - patch, 0)
        assert all(b - a <= int(patch * (1 - overlap)) for a, b in zip(s, s[1:]))
    assert infer.parse_patch("32", 3) == (32, 32, 32) and infer.parse_patch("48,32,16", 3) == (48, 32, 16)
    for bad in ("30", "a,b", "32,32"):
        with pytest.raises(ValueError, match="patch must be"):
            infer.parse_patch(bad, 3)


def test_sliding_window_blends_with_the_gaussian():
    x1 = torch.rand(1, 1, 40, 21, 12)  # k: smaller than a window, zero-padded to 16
    x2 = torch.rand(1, 1, 40, 21, 12)
    p1, p2, f = infer.sliding_window(Pointwise(), x1, x2, (16, 16, 16), progress=False)
    # a pointwise network: every window agrees, blending is exact, padding is cropped
    torch.testing.assert_close(p1, torch.sigmoid(20 * (x1 - 0.5)))
    torch.testing.assert_close(p2, torch.sigmoid(20 * (x2 - 0.5)))
    torch.testing.assert_close(f, torch.tensor(SHIFT).view(1, 3, 1, 1, 1).expand(1, 3, 40, 21, 12))
    # windows that disagree: the Gaussian-weighted mean of their outputs, by brute force
    p1, p2, _ = infer.sliding_window(WindowMean(), x1, x2, (16, 16, 16), overlap=0.5, progress=False)
    xp = torch.nn.functional.pad(x1, (0, 4))[0, 0].numpy()  # 12 -> 16 along k
    g = infer.gaussian_importance((16, 16, 16)).numpy()
    num, den = np.zeros(xp.shape), np.zeros(xp.shape)
    for a in infer.window_starts(40, 16, 0.5):
        for b in infer.window_starts(21, 16, 0.5):
            sl = (slice(a, a + 16), slice(b, b + 16), slice(0, 16))
            num[sl] += g / (1 + np.exp(-(8 * xp[sl].mean() - 2)))
            den[sl] += g
    np.testing.assert_allclose(p1[0, 0].numpy(), (num / den)[..., :12], rtol=1e-5)
    assert len(np.unique(np.round(p1.numpy(), 4))) > 10  # it really varies


@pytest.fixture
def pair_case(tmp_path):
    """Images that are their masks (x 100): a pointwise network predicts the annotations.
    The T2 ball is 2 mm off along world x and drawn on the oblique, coarser T2 grid."""
    w1, w2 = world(S1, A1), world(S2, A2)
    rows = []
    for k, off in enumerate((2.0, -1.5, 3.0)):
        c1, c2 = CENTRE + [0.3 * k, 0, 0], CENTRE + [off, 0, 0]
        save(tmp_path / f"t1_{k}.nii.gz", (ball(w1, c1) * 100).astype(np.float32), A1)
        save(tmp_path / f"t2_{k}.nii.gz", (ball(w2, c2) * 50).astype(np.int16), A2)
        # annotations differ from the images a little: an annotator's extra voxels
        m1 = ball(w1, c1, 9.5)
        save(tmp_path / f"t1_mask_{k}.nii.gz", m1, A1)
        save(tmp_path / f"t2_mask_{k}.nii.gz", ball(w2, c2, 8.5), A2)
        rows.append(dict(id=f"case{k}", t1=tmp_path / f"t1_{k}.nii.gz", t2=tmp_path / f"t2_{k}.nii.gz",
                         t1_mask=tmp_path / f"t1_mask_{k}.nii.gz", t2_mask=tmp_path / f"t2_mask_{k}.nii.gz"))
    return tmp_path, write_manifest(tmp_path / "test.csv", rows)


@pytest.fixture
def fake_checkpoint(monkeypatch, tmp_path):
    """`--checkpoint` resolves to the Pointwise network."""
    ckpt = tmp_path / "fake.pt"
    ckpt.write_bytes(b"")

    class Config:
        omega, crop_max = "elastic", 16

    monkeypatch.setattr(infer, "load_checkpoint_model", lambda path, device="cpu": (Pointwise(), Config()))
    monkeypatch.setattr(evaluate_cases, "load_checkpoint_model", lambda path, device="cpu": (Pointwise(), Config()))
    return ckpt


def brute_dice(a, b):
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    return 1.0 if a.sum() + b.sum() == 0 else 2 * (a & b).sum() / (a.sum() + b.sum())


def test_predict_writes_each_mask_on_its_own_grid(pair_case, fake_checkpoint, capsys):
    tmp, _ = pair_case
    out = tmp / "pred"
    assert main(["predict", "--t1", str(tmp / "t1_0.nii.gz"), "--t2", str(tmp / "t2_0.nii.gz"),
                 "--checkpoint", str(fake_checkpoint), "--out", str(out), "--field", "--patch", "16"]) == 0
    m1, m2, f = (nib.load(str(out / n)) for n in ("t1_mask.nii.gz", "t2_mask.nii.gz", "field.nii.gz"))
    assert m1.shape == S1 and np.allclose(m1.affine, A1) and m1.get_data_dtype() == np.uint8
    assert m2.shape == S2 and np.allclose(m2.affine, A2)
    assert m2.header.get_intent()[0] == nib.load(str(tmp / "t2_0.nii.gz")).header.get_intent()[0]
    # T1: the image thresholded; T2: through the T1 grid and back, close to the T2 ball
    np.testing.assert_array_equal(np.asarray(m1.dataobj), nib.load(str(tmp / "t1_0.nii.gz")).get_fdata() > 50)
    t2_truth = ball(world(S2, A2), CENTRE + [2.0, 0, 0])
    inside = resample(np.ones(S1, np.float32), A1, S2, A2, mask=True) > 0  # the T1 field of view
    assert brute_dice(np.asarray(m2.dataobj)[inside], t2_truth[inside]) > 0.9
    assert not np.asarray(m2.dataobj)[~inside].any()
    assert f.shape == S1 + (1, 3) and np.allclose(f.affine, A1) and f.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(f.get_fdata()[3, 4, 5, 0], SHIFT, rtol=1e-6)


def test_evaluate_equals_a_direct_computation(pair_case, fake_checkpoint, capsys):
    tmp, manifest = pair_case
    out = tmp / "res" / "results.csv"
    assert main(["evaluate", "--manifest", str(manifest), "--checkpoint", str(fake_checkpoint),
                 "--out", str(out), "--patch", "16", "--grid-spacing", "8", "--iters", "30"]) == 0
    printed = capsys.readouterr().out
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["case0", "case1", "case2"]  # cases only: the mean is in .mean.csv
    direct = []
    for case, row in zip(read_manifest(manifest), rows):
        x1 = nib.load(str(case.t1)).get_fdata()
        s1 = nib.load(str(case.t1_mask)).get_fdata()
        s2n = nib.load(str(case.t2_mask)).get_fdata()
        s2 = resample(s2n, A2, S1, A1, mask=True)               # T2 annotation on the T1 grid
        pair = load_pair(case)
        p1 = 1 / (1 + np.exp(-20 * (pair.x1 - 0.5)))
        p2 = 1 / (1 + np.exp(-20 * (pair.x2 - 0.5)))
        m2_own = resample(p2, A1, S2, A2, mask=True)             # as predict writes it
        # warp(p1, constant shift): p1 sampled at x + SHIFT (trilinear, zeros outside)
        from scipy import ndimage
        idx = np.stack(np.meshgrid(*[np.arange(s) for s in S1], indexing="ij")).astype(float)
        warped = ndimage.map_coordinates(p1, idx + np.reshape(SHIFT, (3, 1, 1, 1)), order=1, mode="grid-constant",
                                         cval=0.0)

        def ds(a, b):
            return float(ck.relative_similarity(torch.from_numpy(a > 0.5)[None, None],
                                                torch.from_numpy(b > 0.5)[None, None], grid_spacing=8,
                                                iters=30).score[0])

        d = {"dice_t1": brute_dice(x1 > 50, s1), "dice_t2": brute_dice(m2_own, s2n), "ds_pred": ds(p1, p2),
             "ds_ann": ds(s1, s2), "dice_warped": brute_dice(warped, s2), "dice_annotations": brute_dice(s1, s2)}
        for k, v in d.items():
            assert float(row[k]) == pytest.approx(v, abs=2e-6), (case.id, k)
        direct.append(d)
    assert 0.3 < direct[0]["dice_annotations"] < 0.95 and direct[0]["dice_t1"] < 1  # not trivial cases
    with open(tmp / "res" / "results.mean.csv") as f:
        (mean,) = list(csv.DictReader(f))
    assert mean["summary"] == "mean" and mean["n"] == "3"
    for k in evaluate_cases.METRICS:
        assert float(mean[k]) == pytest.approx(np.mean([d[k] for d in direct]), abs=2e-6)
    test = paired_wilcoxon([d["ds_pred"] for d in direct], [d["ds_ann"] for d in direct])
    assert f"{test.p_value:.3g}" in printed and f"{test.n}, {test.median_difference:+.3f}" in printed
    assert "paper" in printed and "D_S of the predicted pairs" in printed
    assert (tmp / "res" / "results.txt").read_text().strip() == printed.split("\nper case")[0].strip()
    assert (tmp / "res" / "results.png").stat().st_size > 10_000


def test_cli_errors(pair_case, fake_checkpoint, capsys, tmp_path):
    tmp, manifest = pair_case

    def err(argv, match):
        assert main(argv) == 2
        e = capsys.readouterr().err
        (line,) = [ln for ln in e.splitlines() if "error" in ln]
        assert line.startswith("coopseg: error: ") and match in line and "Traceback" not in e

    base = ["--checkpoint", str(fake_checkpoint), "--out", str(tmp / "o")]
    err(["predict", "--t1", str(tmp / "none.nii.gz"), "--t2", str(tmp / "t2_0.nii.gz")] + base,
        "none.nii.gz: no such image file")
    err(["predict", "--t1", str(tmp / "t1_0.nii.gz"), "--t2", str(tmp / "t2_0.nii.gz"), "--patch", "20"] + base,
        "patch must be 3 positive multiples of 16")
    err(["evaluate", "--manifest", str(tmp / "no.csv"), "--checkpoint", str(fake_checkpoint), "--out",
         str(tmp / "r.csv")], "no.csv: no such manifest file")
    nomask = write_manifest(tmp / "nomask.csv", [dict(t1=tmp / "t1_0.nii.gz", t2=tmp / "t2_0.nii.gz")])
    err(["evaluate", "--manifest", str(nomask), "--checkpoint", str(fake_checkpoint), "--out", str(tmp / "r.csv")],
        "no mask given")
    err(["demo-data", str(tmp / "d"), "--pairs", "2", "--test", "2"], "--test must be >= 1 and below --pairs")


def test_missing_checkpoint_is_a_clear_error(pair_case, capsys):
    tmp, _ = pair_case
    assert main(["predict", "--t1", str(tmp / "t1_0.nii.gz"), "--t2", str(tmp / "t2_0.nii.gz"),
                 "--checkpoint", str(tmp / "none.pt"), "--out", str(tmp / "o")]) == 2
    assert "none.pt: no such checkpoint file" in capsys.readouterr().err


def test_train_on_a_manifest_then_predict(pair_case, tmp_path, capsys):
    """The real path: `data: manifest.csv` trains (one step per stage) and predict loads
    the checkpoint through coopseg.train.load_model."""
    from coopseg.train import Config, load_model, train

    tmp, manifest = pair_case
    config = Config(spatial_dims=3, width=0.125, omega="elastic", crop_min=16, crop_max=16, data=str(manifest),
                    steps_segmentor=1, steps_registor=1, steps_joint=1, device="cpu", progress=False)
    ckpt = train(config, tmp / "run")
    net, _ = load_model(ckpt)
    out = tmp / "pred"
    assert main(["predict", "--t1", str(tmp / "t1_1.nii.gz"), "--t2", str(tmp / "t2_1.nii.gz"),
                 "--checkpoint", str(ckpt), "--out", str(out), "--field"]) == 0
    assert (tmp / "run" / "log.csv").read_text().count("\n") == 4  # header + 3 steps
    m1, m2 = nib.load(str(out / "t1_mask.nii.gz")), nib.load(str(out / "t2_mask.nii.gz"))
    assert m1.shape == S1 and m2.shape == S2 and np.allclose(m2.affine, A2)
    # the written T1 mask is the network's blended probability > 0.5 (patch = crop_max = 16)
    pair = load_pair(read_manifest(manifest)[1])
    pred = infer.predict_pair(net, pair, patch=16, progress=False)
    np.testing.assert_array_equal(np.asarray(m1.dataobj), pred.prob1 > 0.5)
    assert 0 < pred.prob1.mean() < 1 and pred.prob1.std() > 0
    bad = tmp / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["predict", "--t1", str(tmp / "t1_1.nii.gz"), "--t2", str(tmp / "t2_1.nii.gz"),
                 "--checkpoint", str(bad), "--out", str(out)]) == 2
    assert "bad.pt: cannot load as a coopseg checkpoint" in capsys.readouterr().err


class Pointwise2D(torch.nn.Module):
    spatial_dims = 2

    def forward(self, x1, x2):
        coarse = torch.tensor(SHIFT[:2]).view(1, 2, 1, 1).expand(x1.shape[0], 2, 1, 1)
        return 20 * (x1 - 0.5), 20 * (x2 - 0.5), coarse.contiguous()


def test_2d_checkpoints_run_slice_by_slice(pair_case):
    tmp, manifest = pair_case
    pair = load_pair(read_manifest(manifest)[0])
    pred = infer.predict_pair(Pointwise2D(), pair, patch=16, progress=False)
    assert pred.prob1.shape == S1 and pred.field.shape == (2,) + S1
    np.testing.assert_allclose(pred.prob1, 1 / (1 + np.exp(-20 * (pair.x1 - 0.5))), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.field[:, 3, 4, 5], SHIFT[:2], rtol=1e-6)
    m = evaluate_cases.case_metrics(pred, pair, grid_spacing=8, iters=5)
    # the warp acts in each k-slice: p1 sampled at (i + 1, j - 2, k)
    warped = np.zeros_like(pred.prob1)
    warped[:-1, 2:] = pred.prob1[1:, :-2]
    assert m["dice_warped"] == pytest.approx(brute_dice(warped, pair.s2), abs=1e-9)
