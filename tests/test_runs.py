"""Runs under bad input and concurrent use: the lock on an output folder (two real
processes, a lock left by kill -9), stale temporary files, --resume with changed step
counts or a missing/damaged log, diverging runs and non-finite checkpoints, damaged
checkpoints as one-line errors, predict --device, a full disk, toy reruns with other
settings. Tiny shapes throughout (the TINY config of tests/test_train.py)."""
import csv
import dataclasses
import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import coopseg.checkpoint as C
import coopseg.train as T
from coopseg import cli, infer, toy
from coopseg.data.volumes import Case, Pair
from coopseg.errors import CoopsegError
from coopseg.train import Config, Diverged, Interrupted, train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(toy_pairs=3, toy_size=32, crop_min=16, crop_max=16, width=0.125, checkpoint_every=2, progress=False,
            steps_segmentor=3, steps_registor=2, steps_joint=1, device="cpu")


def tiny(**kw):
    return Config(**{**TINY, **kw})


def steps(seg, reg, joint, **kw):
    return tiny(steps_segmentor=seg, steps_registor=reg, steps_joint=joint, **kw)


def write_yaml(path, cfg: Config):
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return str(path)


def log_rows(out):
    with open(Path(out) / "log.csv", newline="") as f:
        rows = list(csv.reader(f))
    return [r[:-1] for r in rows[1:]]  # all but the seconds column


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return e


def one_error(capsys, argv, *names):
    """argv fails with exit 2 and one line `coopseg: error: ...` naming each of names."""
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    # one error line, the last (a progress bar left by predict may precede it)
    assert len([ln for ln in lines if "coopseg: error: " in ln]) == 1 and "coopseg: error: " in lines[-1], err
    assert "Traceback" not in err, err
    line = lines[-1][lines[-1].index("coopseg: error: "):]
    for name in names:
        assert str(name) in line, (name, line)
    return line


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2/1/1 run (checkpoints at steps 2 and 4) to copy and damage."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(steps(2, 1, 1), out)
    return out


def copy_run(src, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- the folder lock

def test_a_second_run_into_a_running_folder_is_refused_and_a_killed_runs_lock_taken_over(tmp_path, capsys):
    long_cfg = write_yaml(tmp_path / "long.yaml", steps(5000, 0, 0, checkpoint_every=1000))
    short_cfg = write_yaml(tmp_path / "short.yaml", steps(1, 0, 1))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "coopseg", "train", "--config", long_cfg, "--out", str(out)],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (out / "log.csv").exists() and len((out / "log.csv").read_text().splitlines()) >= 2:
                break  # in its loop, holding OUT/.lock
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        # a second run, and a --resume of the running one: refused, naming the folder and the holder
        for extra in ([], ["--resume"]):
            line = one_error(capsys, ["train", "--config", short_cfg, "--out", out, *extra],
                             out, f"pid {proc.pid}", "in use")
        assert "another coopseg train" in line and f"pid={proc.pid}" in (out / ".lock").read_text()
        assert not (out / "last.pt").exists() and proc.poll() is None
        proc.kill()  # kill -9: the lock file stays, the OS drops the lock
        proc.wait()
    finally:
        proc.kill()
        proc.stderr.close()
    assert (out / ".lock").exists()
    assert cli.main(["train", "--config", short_cfg, "--out", str(out)]) == 0  # the stale lock is taken over
    assert [r[1] for r in log_rows(out)] == ["segmentor", "joint"]
    assert not (out / ".lock").exists()


def hold_lock(folder: Path):
    """Lock FOLDER/.lock the way a running coopseg process does (flock), with its note."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"pid=4242\nhost=elsewhere\nstarted=today\n")
    return fd


def test_toy_into_a_folder_in_use_is_refused(tmp_path, capsys):
    out = tmp_path / "toy"
    fd = hold_lock(out)
    try:
        one_error(capsys, ["toy", "--out", out, "--steps", "1", "1", "1", "--lambda-r", "1", "--test-pairs", "1",
                           "--width", "0.125", "--crop", "32"], out, "pid 4242 on elsewhere", "in use")
        assert not (out / "pretrain").exists()
    finally:
        os.close(fd)


def test_stale_lock_and_temporaries_of_a_killed_write_are_cleaned_on_the_next_start(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    gone = dead_pid()
    live = subprocess.Popen(["sleep", "60"])
    try:
        (out / ".lock").write_text(f"pid={gone}\n")  # no process holds it
        stale = [out / f".last.pt.tmp{gone}", out / f".log.csv.tmp{gone}", out / f".config.yaml.tmp{gone}"]
        for p in stale:
            p.write_bytes(b"half-written")
        alive = out / f".last.pt.tmp{live.pid}"
        alive.write_bytes(b"being written")
        other = out / ".notes.tmpfile"
        other.write_text("not ours")
        train(steps(1, 0, 0), out)
        assert not any(p.exists() for p in stale)
        assert alive.exists() and other.exists()  # a live process's file, and what is not ours, are kept
        assert not (out / ".lock").exists()
    finally:
        live.kill()
        live.wait()


# ----------------------------------------------------------------------------- --resume and step counts

def test_resume_with_more_steps_continues_exactly_as_a_fresh_run(tmp_path):
    ref = tmp_path / "ref"
    train(steps(2, 1, 2), ref)
    longer = tmp_path / "longer"  # finished 2/1/1, then joint raised to 2
    train(steps(2, 1, 1), longer)
    train(steps(2, 1, 2), longer, resume=True)
    assert log_rows(longer) == log_rows(ref)
    ckpt = torch.load(longer / "last.pt", weights_only=True)
    torch.testing.assert_close(ckpt["model"], torch.load(ref / "last.pt", weights_only=True)["model"], rtol=0, atol=0)
    assert ckpt["config"]["steps_segmentor"] == 2 and ckpt["config"]["steps_joint"] == 2
    assert ckpt["done"] == {"segmentor": 2, "registor": 1, "joint": 2}
    assert "steps_joint: 2" in (longer / "config.yaml").read_text()
    # (stopped inside a stage, then more steps for that stage: the refusal test's last case)


@pytest.mark.parametrize("first, stop, again, match", [
    # the case (2/2/4 stopped in the joint stage, resumed as 4/2/2), smaller
    ((1, 1, 2), 3, (2, 1, 1), "finished the segmentor stage after 1 steps and went on to the joint stage; "
                              "steps_segmentor is now 2"),
    ("finished", None, (1, 1, 1), "steps_segmentor is now 1"),
    ("finished", None, (2, 1, 0), "1 joint steps are done, steps_joint is now 0"),
    ((2, 1, 1), 2, (1, 1, 1), "2 segmentor steps are done, steps_segmentor is now 1"),
    ((1, 1, 1), 2, (1, 2, 1), None),  # in stage 2: more registor steps are a start of the new plan
])
def test_resume_with_step_counts_it_cannot_honour_is_refused(tmp_path, capsys, finished, first, stop, again, match):
    if first == "finished":
        out = copy_run(finished, tmp_path)
    else:
        out = tmp_path / "run"
        train(steps(*first), out, stop_after=stop)
    before = (out / "log.csv").read_bytes(), (out / "last.pt").read_bytes()
    cfg = write_yaml(tmp_path / "again.yaml", steps(*again))
    if match is None:
        assert cli.main(["train", "--config", cfg, "--out", str(out), "--resume"]) == 0
        assert [r[1] for r in log_rows(out)] == ["segmentor", "registor", "registor", "joint"]
        return
    one_error(capsys, ["train", "--config", cfg, "--out", out, "--resume"], out / "last.pt", match,
              "a new --out")
    assert ((out / "log.csv").read_bytes(), (out / "last.pt").read_bytes()) == before  # nothing touched


def _drop_row(text):
    lines = text.splitlines(keepends=True)
    return "".join(lines[:3] + lines[4:])


@pytest.mark.parametrize("damage, match", [
    (None, "missing, but"),
    (lambda t: t.splitlines(keepends=True)[0], "has 0 rows, but"),
    (_drop_row, "damaged at line 4 (expected the row of step 3, registor"),
    (lambda t: t.replace("step,stage", "STEP;stage"), "damaged (first line is not the header"),
    (lambda t: t[:40] + "\x00\x00garbage\n" + t[40:], "damaged at line 2 (expected the row of step 1"),
    (lambda t: "\n".join(ln.replace("segmentor", "joint") for ln in t.splitlines()) + "\n", "damaged at line 2"),
])
def test_resume_refuses_a_missing_or_damaged_log(tmp_path, capsys, finished, damage, match):
    out = copy_run(finished, tmp_path)
    log = out / "log.csv"
    if damage is None:
        log.unlink()
    else:
        log.write_text(damage(log.read_text()))
    before = log.read_bytes() if log.exists() else None
    cfg = write_yaml(tmp_path / "c.yaml", steps(2, 1, 1))
    one_error(capsys, ["train", "--config", cfg, "--out", out, "--resume"], log, match,
              *(["is at step 4"] if damage is None else []))
    assert (log.read_bytes() if log.exists() else None) == before  # not rewritten with rows gone


# ----------------------------------------------------------------------------- diverging runs

def test_a_diverging_run_stops_with_exit_2_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "c.yaml", steps(4, 0, 0, lr=1e10, checkpoint_every=1))
    one_error(capsys, ["train", "--config", cfg, "--out", out], "not finite", "lower lr", out / "last.pt",
              "(step 1) is kept")
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                     if v.is_floating_point())


def test_a_non_finite_loss_stops_before_the_update(tmp_path, monkeypatch):
    real, calls = T.segmentation_loss, []

    def nan_at_2(*a):
        calls.append(1)
        loss = real(*a)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(T, "segmentation_loss", nan_at_2)
    with pytest.raises(Diverged, match=r"step 2 \(segmentor\): the loss is not finite \(total nan.*"
                                       r"step 1\) is kept"):
        train(steps(3, 0, 0, checkpoint_every=1), tmp_path)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, finished):
    """A good checkpoint and damaged ones."""
    d = tmp_path_factory.mktemp("ckpts")
    good = finished / "last.pt"
    state = torch.load(good, weights_only=True)
    nan = dict(state, model=dict(state["model"]))
    key = "segmentor.down_tr64.ops.0.conv1.weight"
    nan["model"][key] = nan["model"][key].clone()
    nan["model"][key][0, 0, 0, 0] = float("nan")
    torch.save(nan, d / "nan.pt")
    raw = good.read_bytes()
    (d / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (d / "empty.pt").write_bytes(b"")
    (d / "text.pt").write_text("step,stage\n1,joint\n")
    torch.save({"weights": torch.zeros(3)}, d / "nokeys.pt")
    torch.save([torch.zeros(3)], d / "list.pt")
    wide = dict(state, config=dict(state["config"], width=0.25))
    torch.save(wide, d / "wide.pt")
    (d / "folder.pt").mkdir()
    return d, good, key


def test_predict_and_evaluate_refuse_non_finite_weights(tmp_path, capsys, checkpoints):
    import nibabel as nib

    d, _, key = checkpoints
    img = nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4))
    for name in ("t1", "t2", "m1", "m2"):
        nib.save(img, str(tmp_path / f"{name}.nii.gz"))
    out = tmp_path / "pred"
    one_error(capsys, ["predict", "--t1", tmp_path / "t1.nii.gz", "--t2", tmp_path / "t2.nii.gz",
                       "--checkpoint", d / "nan.pt", "--out", out], d / "nan.pt", repr(key), "non-finite")
    assert not out.exists()
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"t1,t2,t1_mask,t2_mask\n{tmp_path}/t1.nii.gz,{tmp_path}/t2.nii.gz,"
                        f"{tmp_path}/m1.nii.gz,{tmp_path}/m2.nii.gz\n")
    one_error(capsys, ["evaluate", "--manifest", manifest, "--checkpoint", d / "nan.pt",
                       "--out", tmp_path / "r.csv"], d / "nan.pt", repr(key))
    assert not (tmp_path / "r.csv").exists()


class NanNet(torch.nn.Module):
    spatial_dims = 3

    def forward(self, x1, x2):
        coarse = torch.zeros(x1.shape[0], 3, *[s // 16 for s in x1.shape[2:]])
        return x1 * float("nan"), x2, coarse


def test_no_mask_from_non_finite_probabilities(tmp_path, monkeypatch, capsys):
    import nibabel as nib

    pair = Pair(case=Case(id="c7", t1=Path("a.nii.gz"), t2=Path("b.nii.gz")), x1=np.ones((16, 16, 16), np.float32),
                x2=np.ones((16, 16, 16), np.float32), s1=None, s2=None, t1_img=None, t2_img=None)
    with pytest.raises(CoopsegError, match=r"case c7 \(a.nii.gz, b.nii.gz\): the network's T1 probabilities "
                                           r"are not finite at 4096 of 4096 voxels"):
        infer.predict_pair(NanNet(), pair, patch=16, progress=False)
    # through the command line: exit 2, nothing written
    img = nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4))
    nib.save(img, str(tmp_path / "t1.nii.gz"))
    nib.save(img, str(tmp_path / "t2.nii.gz"))

    class Cfg:
        crop_max = 16

    monkeypatch.setattr(infer, "load_checkpoint_model", lambda path, device="cpu": (NanNet(), Cfg()))
    out = tmp_path / "pred"
    one_error(capsys, ["predict", "--t1", tmp_path / "t1.nii.gz", "--t2", tmp_path / "t2.nii.gz", "--checkpoint",
                       tmp_path / "x.pt", "--out", out], "not finite", "no mask written")
    assert not (out / "t1_mask.nii.gz").exists()


# ----------------------------------------------------------------------------- damaged checkpoints: one line

BAD_CHECKPOINTS = [
    ("truncated.pt", "cannot load as a coopseg checkpoint"),
    ("empty.pt", "cannot load as a coopseg checkpoint"),
    ("text.pt", "cannot load as a coopseg checkpoint"),
    ("nokeys.pt", "not a coopseg training checkpoint (no 'model', 'config'"),
    ("list.pt", "not a coopseg checkpoint (holds a list"),
    ("folder.pt", "is a folder, expected a checkpoint file"),
]


@pytest.mark.parametrize("name, match", BAD_CHECKPOINTS + [("wide.pt", "do not fit the model its config describes")])
def test_predict_with_a_damaged_checkpoint_is_one_line(tmp_path, capsys, checkpoints, name, match):
    d = checkpoints[0]
    one_error(capsys, ["predict", "--t1", tmp_path / "t1.nii.gz", "--t2", tmp_path / "t2.nii.gz", "--checkpoint",
                       d / name, "--out", tmp_path / "o"], d / name, match)


@pytest.mark.parametrize("name, match", BAD_CHECKPOINTS + [("nan.pt", "non-finite values")])
def test_resume_from_a_damaged_checkpoint_is_one_line(tmp_path, capsys, checkpoints, finished, name, match):
    out = copy_run(finished, tmp_path)
    src = checkpoints[0] / name
    (out / "last.pt").unlink()
    if src.is_dir():
        (out / "last.pt").mkdir()
    else:
        shutil.copy(src, out / "last.pt")
    if name == "nokeys.pt":
        match = "not a coopseg training checkpoint (no 'model', 'optimizer'"
    cfg = write_yaml(tmp_path / "c.yaml", steps(2, 1, 1))
    one_error(capsys, ["train", "--config", cfg, "--out", out, "--resume"], out / "last.pt", match)


@pytest.mark.parametrize("device, match", [
    ("foo", "--device foo: expected cpu, cuda or cuda:N"),
    ("cuda:99", "--device cuda:99: "),
    ("meta", "--device meta: expected cpu, cuda or cuda:N"),
])
def test_predict_device_errors_name_the_device(tmp_path, capsys, checkpoints, device, match):
    good = checkpoints[1]
    line = one_error(capsys, ["predict", "--t1", tmp_path / "t1.nii.gz", "--t2", tmp_path / "t2.nii.gz",
                              "--checkpoint", good, "--out", tmp_path / "o", "--device", device], match)
    assert str(good) not in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_predict_device_cuda_without_cuda(tmp_path, capsys, checkpoints):
    line = one_error(capsys, ["predict", "--t1", tmp_path / "t1.nii.gz", "--t2", tmp_path / "t2.nii.gz",
                              "--checkpoint", checkpoints[1], "--out", tmp_path / "o", "--device", "cuda"],
                     "--device cuda: no CUDA device on this machine")
    assert str(checkpoints[1]) not in line


# ----------------------------------------------------------------------------- writes that fail

def test_a_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C.torch, "save", full)
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "c.yaml", steps(2, 0, 0))
    one_error(capsys, ["train", "--config", cfg, "--out", out], f"cannot write {out / 'last.pt'}: "
              "No space left on device")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "log.csv"]


def test_an_output_folder_that_cannot_be_created_is_one_line(tmp_path, capsys, monkeypatch):
    cfg = write_yaml(tmp_path / "c.yaml", steps(1, 0, 0))
    real = Path.mkdir

    def read_only(self, *a, **k):
        if self.name == "run":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    one_error(capsys, ["train", "--config", cfg, "--out", tmp_path / "ro" / "run"],
              "cannot create the output folder", "Permission denied")


# ----------------------------------------------------------------------------- toy reruns

TOY = toy.ToySettings(lambda_r=(1.0,), width=0.125, steps_segmentor=1, steps_registor=1, steps_joint=1,
                      crop_min=16, crop_max=16, test_pairs=1)


def test_toy_rerun_with_other_settings_is_refused_and_more_joint_steps_resume(tmp_path, monkeypatch):
    toy.run_toy(tmp_path, TOY, log=lambda m: None)
    point = toy.lambda_dir(tmp_path, 1.0) / "last.pt"
    before = point.read_bytes()
    trained = []
    real_train = toy.train

    def spy(*a, **k):
        trained.append(k.get("stages"))
        return real_train(*a, **k)

    monkeypatch.setattr(toy, "train", spy)
    for change, match in ((dict(steps_segmentor=3), r"pretrain/last.pt was trained with other settings "
                                                     r"\(steps_segmentor 1 there, 3 now\)"),
                          (dict(width=0.25), r"pretrain/last.pt was trained with other settings \(width"),
                          (dict(steps_joint=0), r"lambda_r_1.0000/last.pt was trained with other settings "
                                                r"\(steps_joint 1 there, 0 now\)")):
        with pytest.raises(CoopsegError, match=match):
            toy.run_toy(tmp_path, dataclasses.replace(TOY, **change), log=lambda m: None)
    assert trained == [] and point.read_bytes() == before  # nothing reused, nothing trained
    toy.run_toy(tmp_path, dataclasses.replace(TOY, steps_joint=2), log=lambda m: None)
    assert trained == [("joint",)]
    assert [r[1] for r in log_rows(point.parent)] == ["joint", "joint"]
    assert torch.load(point, weights_only=True)["step"] == 2


# ----------------------------------------------------------------------------- the sweep's other inputs

def test_log_with_a_byte_order_mark_or_crlf_resumes(tmp_path, finished):
    for name, edit in (("bom", lambda b: b"\xef\xbb\xbf" + b), ("crlf", lambda b: b.replace(b"\n", b"\r\n"))):
        out = copy_run(finished, tmp_path, name)
        (out / "log.csv").write_bytes(edit((out / "log.csv").read_bytes()))
        train(steps(2, 1, 1), out, resume=True)  # nothing left to do: the log is read and kept
        assert log_rows(out) == log_rows(finished)


def test_checkpoint_without_a_progress_record_and_with_a_damaged_one(tmp_path, capsys, finished):
    """A last.pt from before `done` was stored resumes (progress from its config); a `done`
    that does not add up to its step is refused."""
    out = copy_run(finished, tmp_path, "old")
    state = torch.load(out / "last.pt", weights_only=True)
    del state["done"]
    torch.save(state, out / "last.pt")
    train(steps(2, 1, 2), out, resume=True)
    assert [r[1] for r in log_rows(out)] == ["segmentor", "segmentor", "registor", "joint", "joint"]
    out = copy_run(finished, tmp_path, "bad")
    torch.save(dict(state, done={"segmentor": 1}), out / "last.pt")
    cfg = write_yaml(tmp_path / "c.yaml", steps(2, 1, 1))
    one_error(capsys, ["train", "--config", cfg, "--out", out, "--resume"], out / "last.pt",
              "damaged progress record")


def test_a_broken_link_as_last_pt_is_not_a_missing_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").symlink_to(tmp_path / "unmounted" / "last.pt")
    cfg = write_yaml(tmp_path / "c.yaml", steps(1, 0, 0))
    one_error(capsys, ["train", "--config", cfg, "--out", out, "--resume"], out / "last.pt", "a link to",
              "which does not exist")
    one_error(capsys, ["train", "--config", cfg, "--out", out], out / "last.pt", "exists: pass --resume")
    assert (out / "last.pt").is_symlink()


def test_toy_lambda_values_sharing_a_folder_are_refused(tmp_path, capsys):
    for values in (["0.1", "0.1"], ["0.1", "0.10001"]):
        one_error(capsys, ["toy", "--out", tmp_path / "t", "--lambda-r", *values, "--steps", "1", "1", "1"],
                  "are one sweep point (folder lambda_r_0.1000)")
    assert not (tmp_path / "t" / "pretrain").exists()


def test_interrupts_outside_the_loop_and_in_toy_are_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "build_training_data", interrupted)  # Ctrl-C while loading the data
    cfg = write_yaml(tmp_path / "c.yaml", steps(1, 0, 0))
    assert cli.main(["train", "--config", cfg, "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "coopseg train: interrupted before training started; nothing written to the checkpoint"
    assert not (tmp_path / "run" / ".lock").exists()

    def stopped(config, out, **k):
        raise Interrupted(signal.SIGTERM, 7, Path(out) / "last.pt")

    monkeypatch.setattr(toy, "train", stopped)
    assert cli.main(["toy", "--out", str(tmp_path / "t"), "--steps", "1", "1", "1", "--lambda-r", "1"]) == 143
    err = capsys.readouterr().err
    assert "coopseg toy: stopped by SIGTERM after step 7 of" in err and "Traceback" not in err
    assert not (tmp_path / "t" / ".lock").exists()
