"""The toy experiment (coopseg/toy.py): a seconds-long smoke run of the whole
pipeline (pretrain once, joint stage per lambda_r, D_S evaluation, CSV, plot,
resume) and the command-line errors."""
import csv

import pytest
import torch

import coopseg_kernels as ck
from coopseg import cli, toy

TINY = toy.ToySettings(lambda_r=(0.0, 1.0), width=0.125, steps_segmentor=2, steps_registor=2, steps_joint=2,
                       crop_min=32, crop_max=32, test_pairs=3)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    summary = toy.run_toy(out, TINY, log=lambda m: None)
    return out, summary


def test_toy_pipeline_writes_csv_plot_and_table(tiny_run):
    out, summary = tiny_run
    with open(out / "toy.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["lambda_r", "pair", "ds_pred", "ds_truth", "gain", "dice1", "dice2"]
    assert len(rows) == len(TINY.lambda_r) * TINY.test_pairs
    assert {float(r["lambda_r"]) for r in rows} == set(TINY.lambda_r)
    for r in rows:
        assert float(r["gain"]) == pytest.approx(float(r["ds_pred"]) - float(r["ds_truth"]), abs=2e-6)
        for k in ("ds_pred", "ds_truth", "dice1", "dice2"):
            assert 0.0 <= float(r[k]) <= 1.0
    # D_S of the annotations: the same test pairs, recomputed independently
    data = toy.test_set(TINY.test_pairs)
    truth = ck.relative_similarity(data["s1"] > 0.5, data["s2"] > 0.5, omega="translation",
                                   max_translation=32).score.flatten()
    got = [float(r["ds_truth"]) for r in rows if float(r["lambda_r"]) == 0.0]
    assert got == pytest.approx(truth.tolist(), abs=1e-5)
    # the two sweep points are different models, started from one shared pretraining
    assert (out / "pretrain" / "last.pt").exists()
    a = torch.load(toy.lambda_dir(out, 0.0) / "last.pt", weights_only=True)["model"]
    b = torch.load(toy.lambda_dir(out, 1.0) / "last.pt", weights_only=True)["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    assert (out / "toy.png").stat().st_size > 1000
    assert [s["lambda_r"] for s in summary] == [0.0, 1.0]
    assert "| λ_r |" in (out / "toy.md").read_text()


def test_toy_rerun_resumes_without_training(tiny_run, monkeypatch):
    out, summary = tiny_run

    def no_training(*a, **k):
        raise AssertionError("finished sweep points must not be trained again")
    monkeypatch.setattr(toy, "train", no_training)
    again = toy.run_toy(out, TINY, log=lambda m: None)
    assert again == summary


def test_summarise_median_and_quartiles():
    rows = [dict(lambda_r=0.5, pair=i, gain=g, ds_pred=0.9, ds_truth=0.8, dice1=1.0, dice2=0.5)
            for i, g in enumerate([-0.1, 0.3, 0.1, 0.2, 0.0])]
    (s,) = toy.summarise(rows)
    assert s["gain_median"] == pytest.approx(0.1)
    assert s["gain_positive"] == pytest.approx(3 / 5)
    assert s["n"] == 5 and s["dice2"] == pytest.approx(0.5)


@pytest.mark.parametrize("argv, message", [
    (["--lambda-r", "1.5"], "--lambda-r: values must be in [0, 1], got 1.5"),
    (["--test-pairs", "0"], "--test-pairs: must be in [1, 100000], got 0"),
    (["--test-pairs", "100000001"], "--test-pairs: must be in [1, 100000], got 100000001"),  # before the pretraining
    (["--crop", "20"], "--crop: must be a multiple of 16"),
    (["--width", "0"], "--width: must be a finite number > 0"),
    (["--width", "inf"], "--width: must be a finite number > 0"),
    (["--device", "tpu"], "--device: expected cpu or cuda"),
    (["--max-shift", "33"], "--max-shift: must be ints in [0, 32] (pixels), got 33"),
    (["--max-shift", "4", "-1"], "--max-shift: must be ints in [0, 32] (pixels), got -1"),
    (["--max-shift", "4", "4"], "--max-shift: values must be distinct"),
])
def test_toy_cli_errors(tmp_path, capsys, argv, message):
    assert cli.main(["toy", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("coopseg: error: ") and message in err[0]


def test_toy_cli_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert cli.main(["toy", "--out", str(out), "--steps", "1", "1", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--out" in err[0] and "is not a directory" in err[0]


def test_toy_cli_needs_out(capsys):
    assert cli.main(["toy"]) == 2  # argparse's error becomes the one-line CLI error
    err = capsys.readouterr().err
    assert err.startswith("coopseg: error:") and "--out" in err and err.count("\n") == 1


def test_run_toy_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="lambda_r"):
        toy.run_toy(tmp_path, toy.ToySettings(**{**TINY.__dict__, "lambda_r": (-0.1,)}))
    with pytest.raises(ValueError, match="test_pairs"):
        toy.run_toy(tmp_path, toy.ToySettings(**{**TINY.__dict__, "test_pairs": 0}))
    for bad in (33, -1, True, 4.0):
        with pytest.raises(ValueError, match=r"max_shift must be an int in \[0, 32\]"):
            toy.run_toy(tmp_path, toy.ToySettings(**{**TINY.__dict__, "max_shift": bad}))
    with pytest.raises(ValueError, match="shifts must be distinct"):
        toy.run_shift_sweep(tmp_path, TINY, [4, 4])


def test_shift_sweep_trains_and_tests_on_each_shift(tmp_path):
    """--max-shift 0 3: one sweep per shift, on data with that shift (training config and
    test pairs), side by side in shifts.md / shifts.png."""
    import yaml

    settings = toy.ToySettings(**{**TINY.__dict__, "lambda_r": (1.0,)})
    rows = toy.run_shift_sweep(tmp_path, settings, [3, 0], log=lambda m: None)
    assert [(r["max_shift"], r["lambda_r"]) for r in rows] == [(0, 1.0), (3, 1.0)]
    for ms in (0, 3):
        d = toy.shift_dir(tmp_path, ms)
        assert yaml.safe_load((d / "pretrain" / "config.yaml").read_text())["toy_max_shift"] == ms
        with open(d / "toy.csv", newline="") as f:
            got = [float(r["ds_truth"]) for r in csv.DictReader(f)]
        data = toy.test_set(TINY.test_pairs, max_shift=ms)
        truth = ck.relative_similarity(data["s1"] > 0.5, data["s2"] > 0.5, omega="translation",
                                       max_translation=32).score.flatten()
        assert got == pytest.approx(truth.tolist(), abs=1e-5)
    # the test pairs really differ in shift: at 0 px the masks' centroids nearly coincide
    # (only the blobs' own jitter of <= 3 px), at 32 px they are far apart for most pairs
    def centroid_gap(d):
        yy, xx = torch.meshgrid(torch.arange(240.0), torch.arange(240.0), indexing="ij")
        c = [torch.stack([(s[:, 0] * g).sum((1, 2)) / s[:, 0].sum((1, 2)) for g in (yy, xx)], 1)
             for s in (d["s1"], d["s2"])]
        return (c[0] - c[1]).abs().amax(1)
    assert centroid_gap(toy.test_set(8, max_shift=0)).max() < 6
    assert centroid_gap(toy.test_set(8, max_shift=32)).median() > 8
    table = (tmp_path / "shifts.md").read_text()
    assert "| 0 | 1.00 |" in table and "| 3 | 1.00 |" in table
    assert (tmp_path / "shifts.png").stat().st_size > 1000


def test_oracle_gate_trains_on_s2_star_and_reports_the_ceiling(tmp_path):
    """`coopseg toy --oracle`: the segmentor alone on (s1, s2*), the toy's segmentor budget,
    evaluated against s2* and s2, with the D_S gain over the annotations' own."""
    import yaml

    settings = toy.ToySettings(**{**TINY.__dict__, "max_shift": 32, "segmentor": "unet", "unet_levels": 3})
    row = toy.run_oracle(tmp_path, settings, log=lambda m: None)
    cfg = yaml.safe_load((tmp_path / "segmentor" / "config.yaml").read_text())
    assert cfg["toy_target"] == "oracle" and cfg["segmentor"] == "unet" and cfg["unet_levels"] == 3
    assert cfg["steps_segmentor"] == TINY.steps_segmentor + TINY.steps_joint and cfg["steps_registor"] == 0
    data = toy.test_set(TINY.test_pairs, max_shift=32)
    s1, s2, s2o = (data[k] > 0.5 for k in ("s1", "s2", "s2_oracle"))
    assert row["dice_truth"] == pytest.approx(ck.dice(s2, s2o).mean().item(), abs=1e-6)
    assert row["dice_truth"] < 0.99            # s2* is not s2: the gate measures the copy, not the annotation
    with open(tmp_path / "oracle.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == TINY.test_pairs and set(rows[0]) >= {"gain", "dice_oracle", "dice2", "dice1"}
    assert "Dice(ŝ2, s2*)" in (tmp_path / "oracle.md").read_text()


def test_toy_cli_oracle(tmp_path, capsys):
    code = cli.main(["toy", "--out", str(tmp_path / "o"), "--oracle", "--steps", "2", "0", "1", "--width", "0.125",
                     "--crop", "64", "--test-pairs", "2", "--max-shift", "8", "--segmentor", "unet"])
    assert code == 0
    assert "Dice(ŝ2, s2*)" in capsys.readouterr().out
    assert cli.main(["toy", "--out", str(tmp_path / "p"), "--oracle", "--max-shift", "0", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--oracle takes one --max-shift value" in err[0]
