"""The training loop: config errors, loss going down, checkpoints, exact resume
(after stop, after SIGTERM), and a 2-process gloo DDP run. Tiny shapes throughout."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coopseg import cli
from coopseg.train import Config, ConfigError, Interrupted, load_config, load_model, train, write_default_config

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(toy_pairs=3, toy_size=32, crop_min=16, crop_max=32, width=0.125, checkpoint_every=2, progress=False,
            steps_segmentor=3, steps_registor=2, steps_joint=3, device="cpu")


def tiny(**kw):
    return Config(**{**TINY, **kw})


def log_rows(out):
    with open(Path(out) / "log.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "stage", "total", "seg", "reg", "sim", "seconds"]
    return [r[:-1] for r in rows[1:]]  # all but the seconds column


def write_yaml(path, cfg: Config):
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # Same thread count as this process: float reductions (and so the log) depend on it.
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env


# ---------------------------------------------------------------- config

def test_default_config_round_trip(tmp_path):
    write_default_config(tmp_path / "cfg.yaml")
    text = (tmp_path / "cfg.yaml").read_text()
    assert "# weight of the similarity loss" in text
    assert load_config(tmp_path / "cfg.yaml") == Config()
    assert Config().data == "toy"


@pytest.mark.parametrize("text,match", [
    ("lambda_p: -1\n", r"lambda_p: expected a number >= 0, got -1"),
    ("spatial_dims: 4\n", r"spatial_dims: expected 2 or 3"),
    ("steps_joint: 1.5\n", r"steps_joint: expected an int >= 0"),
    ("crop_min: 40\n", r"crop_min: expected an int or a list of 2 ints, each a multiple of 16"),
    ("crop_min: 192\ncrop_max: 160\n", r"crop_min: expected sides <= crop_max"),
    ("norm: group\n", r"norm: expected one of cont_bn \| batch \| instance"),
    ("checkpointing: 'yes'\n", r"checkpointing: expected true or false"),
    ("lr: 0\n", r"lr: expected a number > 0"),
    ("registor_lr: -1\n", r"registor_lr: expected a number >= 0, got -1"),
    ("blur_sigma: -2\n", r"blur_sigma: expected a number >= 0, got -2"),
    ("registor_pool: max\n", r"registor_pool: expected one of mean \| mask"),
    ("toy_max_shift: 60\n", r"toy_max_shift: expected null or an int in \[0, toy_size / 4\) = \[0, 60\), got 60"),
    ("toy_max_shift: -1\n", r"toy_max_shift: expected null or an int in"),
    ("toy_max_shift: 4.5\n", r"toy_max_shift: expected null or an int in"),
    ("toy_size: 64\ntoy_max_shift: 16\n", r"toy_max_shift: expected null or an int in \[0, toy_size / 4\) = \[0, 16\)"),
    ("registor_pool: mask\nomega: elastic\n", r"registor_pool: expected mean with omega: elastic"),
    ("toy_target: s1\n", r"toy_target: expected one of s2 \| oracle"),
    ("segmentor: resnet\n", r"segmentor: expected one of genesis \| unet"),
    ("unet_levels: 0\n", r"unet_levels: expected an int in \[1, 7\]"),
    ("unet_context: transformer\n", r"unet_context: expected one of none \| dilated \| attention"),
    ("unet_coords: 1\n", r"unet_coords: expected true or false"),
    ("inside_only: 'no'\n", r"inside_only: expected true or false"),
    ("blur_sigma: 1.0e+308\n", r"blur_sigma: expected a number in \[0, 1000\]"),
    ("blur_sigma: 1" + "0" * 400 + "\n", r"blur_sigma: expected a number >= 0"),
    ("width: 1" + "0" * 400 + "\n", r"width: expected a number > 0"),
    ("data: volumes.txt\n", r"data: expected 'toy' or the path of a .csv manifest"),
    ("spatial_dims: 3\n", r"spatial_dims: expected 2 with data: toy"),
    ("device: gpu\n", r"device: expected auto \| cpu \| cuda \| cuda:N"),
    ("lamda_p: 1\n", r"unknown key 'lamda_p'"),
    ("- 1\n- 2\n", r"expected a mapping"),
    ("seed: [\n", r"not valid YAML"),
])
def test_config_errors_name_key_and_expected_value(tmp_path, text, match):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "c.yaml")


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("lambda_r: fast\n")
    assert cli.main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("coopseg: error: ") and "lambda_r: expected a number >= 0" in err[0]
    assert cli.main(["train", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(tmp_path / "o")]) == 2
    assert "--config" in capsys.readouterr().err
    assert cli.main(["train", "--write-config", str(tmp_path / "w.yaml")]) == 0
    assert load_config(tmp_path / "w.yaml") == Config()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "ok.yaml").write_text("data: toy\nsteps_segmentor: 1\n")
    assert cli.main(["train", "--config", str(tmp_path / "ok.yaml"), "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "is not a directory" in err[0]


# ---------------------------------------------------------------- training

def test_training_lowers_the_loss_and_writes_a_loadable_checkpoint(tmp_path):
    # One pair, whole-image crops, no augmentation: every step sees the same input.
    cfg = tiny(toy_pairs=1, steps_segmentor=12, steps_registor=0, steps_joint=0, lr=1e-2, crop_min=32,
               intensity_shift=0.0, checkpoint_every=100)
    path = train(cfg, tmp_path)
    losses = [float(r[2]) for r in log_rows(tmp_path)]
    assert len(losses) == 12
    assert losses[-1] < 0.7 * losses[0]
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 12 and ckpt["stage"] == "segmentor"
    assert set(ckpt["rng"][0]) == {"data", "torch", "cuda", "numpy", "python"}
    model, loaded_cfg = load_model(path)
    assert loaded_cfg == cfg and not model.training
    assert torch.equal(model.segmentor.out_tr.final_conv.weight, ckpt["model"]["segmentor.out_tr.final_conv.weight"])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary file left


def test_stages_and_init_checkpoint(tmp_path):
    cfg = tiny(steps_segmentor=2, steps_registor=2, steps_joint=2)
    pre = train(cfg, tmp_path / "pre", stages=("segmentor", "registor"))
    assert [r[1] for r in log_rows(tmp_path / "pre")] == ["segmentor"] * 2 + ["registor"] * 2
    state = torch.load(pre, weights_only=True)["model"]
    joint = train(cfg, tmp_path / "joint", stages=("joint",), init_checkpoint=pre)
    rows = log_rows(tmp_path / "joint")
    assert [r[:2] for r in rows] == [["1", "joint"], ["2", "joint"]] and all(r[3] and r[4] and r[5] for r in rows)
    after = torch.load(joint, weights_only=True)["model"]
    assert not torch.equal(after["registor.head.weight"], state["registor.head.weight"])
    with pytest.raises(ValueError, match="ordered subset"):
        train(cfg, tmp_path / "x", stages=("joint", "segmentor"))


def test_blur_sigma_reaches_the_blur_of_both_stages(tmp_path, monkeypatch):
    import coopseg_kernels as ck
    from coopseg.losses import blur_kernel

    seen = []
    real = ck.blur

    def spy(x, *, kernel=(1.0, 2.0, 1.0), **kw):
        seen.append(tuple(kernel))
        return real(x, kernel=kernel, **kw)

    monkeypatch.setattr(ck, "blur", spy)
    train(tiny(steps_segmentor=0, steps_registor=2, steps_joint=2, blur_sigma=1.5), tmp_path)
    assert len(seen) == 8 and set(seen) == {blur_kernel(1.5)} and len(blur_kernel(1.5)) == 11
    seen.clear()
    train(tiny(steps_segmentor=0, steps_registor=1, steps_joint=1), tmp_path / "paper")
    assert len(seen) == 4 and set(seen) == {(1.0, 2.0, 1.0)}


def test_registor_lr_is_the_registor_param_group(tmp_path):
    path = train(tiny(steps_segmentor=1, steps_registor=1, steps_joint=0, registor_lr=3e-4), tmp_path)
    groups = torch.load(path, weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [1e-3, 3e-4]
    path = train(tiny(steps_segmentor=1, steps_registor=0, steps_joint=0), tmp_path / "default")
    assert [g["lr"] for g in torch.load(path, weights_only=True)["optimizer"]["param_groups"]] == [1e-3, 1e-3]


RESUME_CFG = dict(steps_segmentor=10, steps_registor=2, steps_joint=2, checkpoint_every=4)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted run that the resume tests compare against."""
    out = tmp_path_factory.mktemp("full")
    train(tiny(**RESUME_CFG), out)
    return out


def test_resume_reproduces_the_uninterrupted_log(tmp_path, full_run):
    cfg = tiny(**RESUME_CFG)
    full = log_rows(full_run)
    assert len(full) == 14 and [r[1] for r in full] == ["segmentor"] * 10 + ["registor"] * 2 + ["joint"] * 2
    # Stopped mid-stage (checkpoint at 5, not a multiple of checkpoint_every), then a crash
    # leaves a log row beyond the checkpoint: resume drops it and carries on.
    out = tmp_path / "stop"
    train(cfg, out, stop_after=5)
    assert len(log_rows(out)) == 5
    with open(out / "log.csv", "a") as f:
        f.write("6,segmentor,9,9,,,0.1\n")
    train(cfg, out, resume=True)
    assert log_rows(out) == full
    torch.testing.assert_close(torch.load(out / "last.pt", weights_only=True)["model"],
                               torch.load(full_run / "last.pt", weights_only=True)["model"], rtol=0, atol=0)
    # Stopped at a stage boundary.
    out = tmp_path / "boundary"
    train(cfg, out, stop_after=10)
    assert torch.load(out / "last.pt", weights_only=True)["stage"] == "segmentor"
    train(cfg, out, resume=True)
    assert log_rows(out) == full
    with pytest.raises(ConfigError, match="lambda_p"):
        train(tiny(**RESUME_CFG, lambda_p=0.5), out, resume=True)


def test_sigint_from_python_then_resume(tmp_path, monkeypatch, full_run):
    """The signal path in-process: Interrupted carries the step; resume is exact."""
    cfg = tiny(**RESUME_CFG)
    import coopseg.train as T

    real = T.segmentation_loss
    calls = []

    def loss_then_signal(*a):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a)

    monkeypatch.setattr(T, "segmentation_loss", loss_then_signal)
    with pytest.raises(Interrupted) as info:
        train(cfg, tmp_path)
    assert info.value.step == 2 and info.value.signum == signal.SIGINT
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(T, "segmentation_loss", real)
    train(cfg, tmp_path, resume=True)
    assert log_rows(tmp_path) == log_rows(full_run)


def test_sigterm_subprocess_writes_a_checkpoint_and_resume_is_exact(tmp_path, full_run):
    yaml_path = write_yaml(tmp_path / "cfg.yaml", tiny(**RESUME_CFG))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "coopseg", "train", "--config", str(yaml_path), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (out / "log.csv").exists() and len((out / "log.csv").read_text().splitlines()) >= 3:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert 2 <= ckpt["step"] < 14 and len(log_rows(out)) == ckpt["step"]
    done = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert log_rows(out) == log_rows(full_run)
    assert cli.main(cmd[3:]) == 2  # again without --resume: refused, the run is kept


def test_checkpointing_flag_trains_identically(tmp_path):
    cfg = tiny(steps_segmentor=1, steps_registor=1, steps_joint=2)
    train(cfg, tmp_path / "a")
    train(tiny(steps_segmentor=1, steps_registor=1, steps_joint=2, checkpointing=True), tmp_path / "b")
    a, b = log_rows(tmp_path / "a"), log_rows(tmp_path / "b")
    for ra, rb in zip(a, b):
        assert ra[:2] == rb[:2]
        for x, y in zip(ra[2:], rb[2:]):
            assert (x == y == "") or abs(float(x) - float(y)) <= 1e-5 * max(1.0, abs(float(x)))


def test_ddp_two_processes_gloo(tmp_path):
    cfg = tiny(steps_segmentor=2, steps_registor=1, steps_joint=2)
    yaml_path = write_yaml(tmp_path / "cfg.yaml", cfg)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "coopseg", "train", "--config", str(yaml_path), "--out", str(out)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = log_rows(out)
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["data"], ckpt["rng"][1]["data"])  # each rank draws its own crops


def test_three_d_elastic_with_odd_volume_sizes(tmp_path, monkeypatch):
    """The 3-D path (elastic registor) on volumes that are not multiples of 16 (padded)."""
    import coopseg.train as T

    g = torch.Generator().manual_seed(5)
    vols = []
    for shape in ((20, 36, 30), (17, 40, 33)):
        s = (torch.rand(1, *shape, generator=g) > 0.7).float()
        vols.append(dict(x1=torch.rand(1, *shape, generator=g), x2=torch.rand(1, *shape, generator=g),
                         s1=s, s2=torch.roll(s, 2, 2)))
    monkeypatch.setattr(T, "build_training_data", lambda config: vols)
    cfg = tiny(data="volumes.csv", spatial_dims=3, omega="elastic", registor_scale=1.0, crop_min=16,
               crop_max=[32, 48, 32], steps_segmentor=1, steps_registor=1, steps_joint=1, checkpointing=True)
    path = train(cfg, tmp_path)
    rows = log_rows(tmp_path)
    assert [r[1] for r in rows] == ["segmentor", "registor", "joint"]
    model, _ = load_model(path)
    assert model.registor.omega == "elastic" and model.spatial_dims == 3


def test_random_crop_sizes_positions_and_shift():
    from coopseg.train import random_crop

    g = torch.Generator().manual_seed(0)
    base = torch.arange(40 * 70, dtype=torch.float32).reshape(1, 40, 70)
    sample = dict(x1=base, x2=base + 0.5, s1=base, s2=base)
    sides = set()
    for _ in range(30):
        c = random_crop(sample, (16, 32), (48, 64), g, shift=0.2)
        h, w = c["s1"].shape[1:]
        assert h % 16 == 0 and w % 16 == 0 and 16 <= h <= 48 and 32 <= w <= 64
        sides.add((h, w))
        assert torch.equal(c["s1"], c["s2"])            # one box for the whole pair
        real = c["s1"] > 0                              # not the zero padding (40 -> 48, 70 -> 80)
        assert real.any()
        d1, d2 = (c["x1"] - c["s1"])[real], (c["x2"] - c["s1"] - 0.5)[real]
        assert d1.std() < 1e-3 and d2.std() < 1e-3      # one shift per image...
        assert abs(float(d1.mean())) <= 0.2 and abs(float(d2.mean())) <= 0.2
    assert len(sides) > 3                               # ...random sizes and aspect ratios
