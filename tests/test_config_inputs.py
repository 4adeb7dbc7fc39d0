"""Config files as people write them, and the files they point to: every bad input is one
ConfigError / CheckpointError naming the file and key (the CLI: one line, exit 2), never a
traceback or a silently different run. Tiny shapes throughout."""
import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from coopseg import cli
from coopseg.config import Config, ConfigError, load_config, write_default_config
from coopseg.data.volumes import write_manifest
from coopseg.errors import CheckpointError
from coopseg.models import Segmentor, load_genesis
from coopseg.train import load_model, random_crop, train

TINY = "toy_pairs: 2\ntoy_size: 32\ncrop_min: 16\ncrop_max: 32\nwidth: 0.125\nprogress: false\ndevice: cpu\n"


def cfg(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return path


def one_line_error(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("coopseg: error: "), err
    return err[0]


# ---------------------------------------------------------------- what a config must say

@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n", "lr: 0.01\n", "steps_joint: 0\nseed: 3\n"])
def test_a_config_must_name_its_data(tmp_path, text):
    with pytest.raises(ConfigError, match=r"c\.yaml: (empty config|no 'data' key).*data: toy"):
        load_config(cfg(tmp_path, text))


def test_an_empty_config_never_trains(tmp_path, capsys):
    line = one_line_error(capsys, ["train", "--config", str(cfg(tmp_path, "")), "--out", str(tmp_path / "o")])
    assert "empty config" in line and not (tmp_path / "o").exists()


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: line 4, column 1: .*duplicate key 'lr' \(first on line 2\)"):
        load_config(cfg(tmp_path, "data: toy\nlr: 0.1\nseed: 1\nlr: 0.2\n"))
    with pytest.raises(ConfigError, match=r"line 2, .*duplicate key 'a'"):
        load_config(cfg(tmp_path, "data: toy\ncrop_min: {a: 16, a: 32}\n"))
    # a merge key then overriding a merged key is what merges are for: not a duplicate
    with pytest.raises(ConfigError, match=r"unknown key 'base'"):
        load_config(cfg(tmp_path, "base: &b {lr: 0.1}\n<<: *b\nlr: 0.2\ndata: toy\n"))


def test_all_zero_lambdas_are_refused_when_the_joint_stage_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"lambda_r, lambda_g, lambda_p: expected at least one > 0 when "
                                          r"steps_joint > 0 .*Adam's momentum.*got 0, 0.0, 0"):
        load_config(cfg(tmp_path, "data: toy\nlambda_r: 0\nlambda_g: 0.0\nlambda_p: 0\n"))
    with pytest.raises(ConfigError, match="at least one > 0"):
        Config(lambda_r=0, lambda_g=0, lambda_p=0).validate()
    # no joint stage: nothing to weigh
    assert load_config(cfg(tmp_path, "data: toy\nlambda_r: 0\nlambda_g: 0\nlambda_p: 0\nsteps_joint: 0\n")
                       ).steps_joint == 0
    assert load_config(cfg(tmp_path, "data: toy\nlambda_r: 0\nlambda_g: 0\n")).lambda_p == 1.0


# ---------------------------------------------------------------- numbers as people write them

@pytest.mark.parametrize("text,value", [("1e-4", 1e-4), ("1E-4", 1e-4), ("1e4", 1e4), ("+1e-4", 1e-4),
                                        (".5e-3", 5e-4), ("2.5e-3", 2.5e-3), ("1.0e4", 1e4), ("0.001", 1e-3)])
def test_exponent_floats_are_numbers(tmp_path, text, value):
    c = load_config(cfg(tmp_path, f"data: toy\nlr: {text}\nregistor_lr: {text}\n"))
    assert c.lr == value and c.registor_lr == value and isinstance(c.lr, float)


@pytest.mark.parametrize("text", ["'1e-4'", '"1e-4"', "1e-4x", "e-4", "1e", "one", "1,5"])
def test_other_strings_are_not_numbers(tmp_path, text):
    with pytest.raises(ConfigError, match=r"lr: expected a number > 0, got '"):
        load_config(cfg(tmp_path, f"data: toy\nlr: {text}\n"))


@pytest.mark.parametrize("text,match", [
    ("steps_joint: 1e400", r"steps_joint: expected an int >= 0 \(at most 1_000_000_000\), got inf"),
    ("steps_joint: 1000000000000000000000000000000", r"steps_joint: expected an int >= 0 \(at most 1_000_000_000\)"),
    ("steps_joint: " + "9" * 5000, r"steps_joint: expected an int .*got 999999999999\.\.\.9999 "
                                   r"\(an integer of 5000 digits\)"),
    ("seed: 1180591620717411303424", r"seed: expected an int in \[0, 2\*\*40\), got 1180591620717411303424"),
    ("seed: -1", r"seed: expected an int in \[0, 2\*\*40\)"),
    ("checkpoint_every: 1e3", r"checkpoint_every: expected an int >= 1 \(at most 1_000_000_000\), got 1000\.0"),
    ("steps_joint: 0300", r"steps_joint: expected an int .*got 0300 \(YAML 1\.1 reads a leading 0 as octal, = 192; "
                          r"write 300 for decimal\)"),
    ("seed: 010", r"seed: .*got 010 \(YAML 1\.1 reads a leading 0 as octal, = 8"),
    ("steps_joint: 1:30", r"steps_joint: .*got 1:30 \(YAML 1\.1 reads a:b as base 60, = 90\)"),
    ("lr: 1:30.5", r"lr: expected a number > 0, got 1:30\.5 \(YAML 1\.1 reads a:b as base 60"),
    ("lr: 1" + "0" * 5000, r"lr: expected a number > 0, got 100000000000\.\.\.0000 \(an integer of 5001 digits\)"),
])
def test_out_of_range_and_misread_integers_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(cfg(tmp_path, f"data: toy\n{text}\n"))


def test_a_huge_seed_is_one_line_not_a_torch_overflow(tmp_path, capsys):
    path = cfg(tmp_path, "data: toy\nseed: 1180591620717411303424\nsteps_segmentor: 0\nsteps_registor: 0\n"
                         "steps_joint: 0\n")
    line = one_line_error(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "o")])
    assert "seed: expected an int in [0, 2**40)" in line


# ---------------------------------------------------------------- files that are not configs

def test_files_that_are_not_yaml_configs_are_named(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "v.nii"))
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "v.nii.gz"))
    torch.save({"model": {}}, tmp_path / "last.pt")
    cases = {
        "v.nii": "not a YAML config: a NIfTI volume",
        "v.nii.gz": r"not a YAML config: a gzip file \(a \.nii\.gz volume\?\)",
        "last.pt": r"not a YAML config: a zip archive \(a torch \.pt checkpoint\?\)",
        cfg(tmp_path, "data: toy\n# caf\xe9\n".encode("latin-1"), "latin.yaml").name:
            r"not UTF-8 text: byte 0xe9 on line 2",
        cfg(tmp_path, "data: toy\n".encode("utf-16"), "u16.yaml").name: r"not a YAML config: UTF-16 text",
        cfg(tmp_path, b"data: toy\n\0\0\0", "nul.yaml").name: "not a YAML config: a binary file",
        cfg(tmp_path, "# padding\n" * 110_000, "big.yaml").name: r"not a YAML config: larger than 1 MiB",
        cfg(tmp_path, gzip.compress(b"data: toy\n"), "gz.yaml").name: "not a YAML config: a gzip file",
    }
    for name, match in cases.items():
        with pytest.raises(ConfigError, match=rf"{tmp_path / name}: {match}"):
            load_config(tmp_path / name)
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"folder\.yaml: Is a directory \(expected a YAML config file\)"):
        load_config(tmp_path / "folder.yaml")
    with pytest.raises(ConfigError, match=r"none\.yaml: No such file"):
        load_config(tmp_path / "none.yaml")


def test_a_volume_given_as_config_is_one_line(tmp_path, capsys):
    (tmp_path / "t1.nii.gz").write_bytes(gzip.compress(b"\x5c\x01\x00\x00" + bytes(400)))
    line = one_line_error(capsys, ["train", "--config", str(tmp_path / "t1.nii.gz"), "--out", str(tmp_path / "o")])
    assert "t1.nii.gz: not a YAML config: a gzip file" in line


def test_bom_and_crlf_are_fine(tmp_path):
    c = load_config(cfg(tmp_path, "\ufeffdata: toy\r\nlr: 1e-2\r\n".encode("utf-8")))
    assert c.data == "toy" and c.lr == 0.01


# ---------------------------------------------------------------- paths in a config

def _volumes(folder: Path, n=2, shape=(16, 16, 16)) -> Path:
    """A manifest of n tiny pairs (a cube mask; images are the masks plus noise) in `folder`."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    rows = []
    for k in range(n):
        m = np.zeros(shape, np.float32)
        m[4:12, 4 + k:12 + k, 3:11] = 1
        for name, arr in (("t1", m + 0.1 * g.random(shape)), ("t2", m + 0.1 * g.random(shape)),
                          ("t1_mask", m), ("t2_mask", m)):
            nib.save(nib.Nifti1Image(arr.astype(np.float32), np.eye(4)), str(folder / f"{name}_{k}.nii.gz"))
        rows.append({c: folder / f"{c}_{k}.nii.gz" for c in ("t1", "t2", "t1_mask", "t2_mask")})
    return write_manifest(folder / "m.csv", rows)


VOLUME_CFG = ("data: data/m.csv\nspatial_dims: 3\nwidth: 0.125\nomega: elastic\nregistor_scale: 1.0\n"
              "crop_min: 16\ncrop_max: 16\nsteps_segmentor: 2\nsteps_registor: 1\nsteps_joint: 1\n"
              "checkpoint_every: 1\ndevice: cpu\nprogress: false\n")


def test_relative_data_is_relative_to_the_config_folder_and_resume_works_from_anywhere(tmp_path, monkeypatch):
    manifest = _volumes(tmp_path / "proj" / "data")
    path = cfg(tmp_path / "proj", VOLUME_CFG, "cfg.yaml")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the config's relative path is not the cwd's
    config = load_config(Path("..") / "proj" / "cfg.yaml")
    assert config.data == os.path.realpath(manifest)
    out = tmp_path / "run"
    train(config, out, stop_after=2)
    import yaml
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert stored["data"] == os.path.realpath(manifest)
    assert torch.load(out / "last.pt", weights_only=True)["config"]["data"] == os.path.realpath(manifest)
    # resume from yet another cwd, with the config the run stored and with the original one
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--config", str(out / "config.yaml"), "--out", "run", "--resume"]) == 0
    assert (out / "log.csv").read_text().count("\n") == 5  # header + 4 steps
    assert cli.main(["train", "--config", str(path.relative_to(tmp_path)), "--out", "run", "--resume"]) == 0
    model, loaded = load_model(out / "last.pt")
    assert loaded.data == os.path.realpath(manifest) and not model.training


def test_a_missing_relative_path_shows_the_resolved_path(tmp_path, capsys, monkeypatch):
    (tmp_path / "sub").mkdir()
    path = cfg(tmp_path / "sub", "data: missing.csv\n")
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, ["train", "--config", "sub/c.yaml", "--out", "o"])
    assert line.endswith(f"sub/c.yaml: data: {os.path.realpath(tmp_path / 'sub')}/missing.csv does not exist")
    (tmp_path / "sub" / "dir.csv").mkdir()
    path.write_text("data: dir.csv\n")
    with pytest.raises(ConfigError, match=r"data: .*/sub/dir\.csv is not a file"):
        load_config(path)
    home = Path(os.path.expanduser("~"))
    path.write_text("data: ~/surely-not-here-coopseg.csv\n")
    with pytest.raises(ConfigError, match=rf"data: {home}/surely-not-here-coopseg\.csv does not exist"):
        load_config(path)
    path.write_text("data: toy\nspatial_dims: 2\ngenesis: nope.pt\n")
    with pytest.raises(ConfigError, match=rf"genesis: expected '' with spatial_dims: 2 .*{tmp_path}/sub/nope\.pt"):
        load_config(path)


# ---------------------------------------------------------------- Models Genesis weights

def test_genesis_path_is_checked_when_the_config_is_read(tmp_path):
    (tmp_path / "m.csv").write_text("t1,t2\n")
    base = "data: m.csv\nspatial_dims: 3\nwidth: 1\n"
    with pytest.raises(ConfigError, match=rf"genesis: {tmp_path}/none\.pt does not exist"):
        load_config(cfg(tmp_path, base + "genesis: none.pt\n"))
    with pytest.raises(ConfigError, match=r"genesis: Models Genesis weights need width: 1 .*got width: 0\.25"):
        load_config(cfg(tmp_path, base.replace("width: 1", "width: 0.25") + "genesis: c.yaml\n"))


def test_a_genesis_text_file_is_one_line(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("t1,t2\n")
    (tmp_path / "Genesis_Chest_CT.pt").write_text("these are not weights\n")
    path = cfg(tmp_path, "data: m.csv\nspatial_dims: 3\nwidth: 1\nomega: elastic\ngenesis: Genesis_Chest_CT.pt\n"
                         "device: cpu\nprogress: false\n")
    line = one_line_error(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "o")])
    assert f"{tmp_path}/Genesis_Chest_CT.pt: not a torch weights file" in line
    assert "expected Models Genesis weights" in line


def _genesis_file(path, width, drop=()):
    sd = {k: v for k, v in Segmentor(3, width=width).state_dict().items() if k not in drop}
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    return path


def test_load_genesis_refuses_what_is_not_models_genesis(tmp_path):
    seg = Segmentor(3, width=0.125)
    ok = _genesis_file(tmp_path / "ok.pt", 0.125)
    assert load_genesis(seg, ok)["loaded"]
    with pytest.raises(CheckpointError, match=r"wide\.pt: down_tr64\.ops\.0\.conv1\.weight is \(8, 2, 3, 3, 3\) in the "
                                              r"file, \(4, 2, 3, 3, 3\) in this segmentor \(width 0\.125\); "
                                              r"expected Models Genesis weights"):
        load_genesis(seg, _genesis_file(tmp_path / "wide.pt", 0.25))
    with pytest.raises(CheckpointError, match=r"part\.pt: lacks 2 of the segmentor's \d+ parameters "
                                              r"\(e\.g\. up_tr64\.ops\.1\.conv1\.weight\)"):
        load_genesis(seg, _genesis_file(tmp_path / "part.pt", 0.125,
                                        drop=("up_tr64.ops.1.conv1.weight", "up_tr64.ops.1.conv1.bias")))
    torch.save({"model": seg.state_dict(), "optimizer": {}, "config": {}}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"last\.pt: a coopseg training checkpoint, not Models Genesis"):
        load_genesis(seg, tmp_path / "last.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match=r"tensor\.pt: expected Models Genesis weights .*got Tensor"):
        load_genesis(seg, tmp_path / "tensor.pt")
    (tmp_path / "vol.nii.gz").write_bytes(gzip.compress(bytes(400)))
    with pytest.raises(CheckpointError, match=r"vol\.nii\.gz: not a torch weights file \(.*\); expected Models"):
        load_genesis(seg, tmp_path / "vol.nii.gz")
    ok.write_bytes(ok.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match=r"ok\.pt: not a torch weights file"):
        load_genesis(seg, ok)
    with pytest.raises(CheckpointError, match=r"none\.pt: no such file; expected Models Genesis weights"):
        load_genesis(seg, tmp_path / "none.pt")
    with pytest.raises(FileNotFoundError):  # still one, for callers that catch it
        load_genesis(seg, tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match=r": is a folder; expected Models Genesis weights"):
        load_genesis(seg, tmp_path)


# ---------------------------------------------------------------- --write-config

def test_write_config_never_overwrites_and_fails_in_one_line(tmp_path, capsys):
    mine = cfg(tmp_path, "data: mine.csv\nlr: 0.5\n", "mine.yaml")
    line = one_line_error(capsys, ["train", "--write-config", str(mine)])
    assert "mine.yaml exists" in line and mine.read_text() == "data: mine.csv\nlr: 0.5\n"
    (tmp_path / "folder").mkdir()
    line = one_line_error(capsys, ["train", "--write-config", str(tmp_path / "folder")])
    assert "folder exists" in line
    line = one_line_error(capsys, ["train", "--write-config", str(tmp_path / "no" / "such" / "c.yaml")])
    assert f"the folder {tmp_path / 'no' / 'such'} does not exist" in line
    line = one_line_error(capsys, ["train", "--write-config", str(mine / "c.yaml")])
    assert f"the folder {mine} is not a folder" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "mine.yaml"]  # no temporary file left
    assert list((tmp_path / "folder").iterdir()) == []
    write_default_config(tmp_path / "new.yaml")
    assert load_config(tmp_path / "new.yaml") == Config()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (a place nothing can be written)")
def test_write_config_to_an_unwritable_place(tmp_path):
    with pytest.raises(ConfigError, match=r"/proc/coopseg\.yaml: cannot write the config"):
        write_default_config("/proc/coopseg.yaml")


# ---------------------------------------------------------------- the sweep

@pytest.mark.parametrize("text,match", [
    ("LR: 0.01", r"unknown key 'LR' \(did you mean 'lr'\?"),
    ("Lambda_R: 0.1", r"unknown key 'Lambda_R' \(did you mean 'lambda_r'\?"),
    ("lr: [0.01]", r"lr: expected a number > 0, got \[0\.01\]"),
    ("lr: {value: 0.01}", r"lr: expected a number > 0, got \{'value': 0\.01\}"),
    ("lr: .nan", r"lr: expected a number > 0, got nan"),
    ("lambda_r: .inf", r"lambda_r: expected a number >= 0, got inf"),
    ("spatial_dims: 2.0", r"spatial_dims: expected 2 or 3, got 2\.0"),
    ("toy_pairs: 1000000", r"toy_pairs: expected an int >= 1 \(at most 100_000\), got 1000000"),
    ("toy_size: 1048576", r"toy_size: expected an int in \[32, 2048\], a multiple of 16"),
    ("device: 'cuda:01'", r"device: expected auto \| cpu \| cuda \| cuda:N, got 'cuda:01'"),
    ("device: CPU", r"device: expected auto \| cpu \| cuda \| cuda:N \(lower case\), got 'CPU'"),
    ("device: 'cuda:\u0663'", r"device: expected auto \| cpu \| cuda \| cuda:N, got 'cuda:\u0663'"),
    ("checkpointing: on\nprogress: 'yes'", r"progress: expected true or false, got 'yes'"),
    ("lr:\t0.01\n\tseed: 1", r"line 2, column 4: not valid YAML: .*'\\t'.*\(use spaces, not tabs\)"),
    ("lr: 0.01\n---\nlr: 0.02", r"line 3, column 1: not valid YAML: expected a single document in the stream"),
    ("lr: " + "[" * 100_000 + "]" * 100_000, r"not a YAML config: nested too deeply"),
    ("norm: " + "x" * 10_000, r"norm: expected one of cont_bn \| batch \| instance, got 'x{100}.{0,400}'$"),
    ("1: 2", r"unknown key 1 "),
    ("seed: 1\n? [a, b]\n: 2", r"not valid YAML: .*unhashable"),
    ("lr: !!python/object/apply:os.system [echo]", r"line 2, column 5: not valid YAML: could not determine a "
                                                   r"constructor for the tag 'tag:yaml\.org,2002:python/object"),
    ("seed: 2001-12-14", r"seed: expected an int in \[0, 2\*\*40\), got datetime\.date\(2001, 12, 14\)"),
    ("crop_min:", r"crop_min: expected an int or a list of 2 ints, each a multiple of 16 and >= 16, got None"),
])
def test_sweep_of_config_inputs(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(cfg(tmp_path, f"data: toy\n{text}\n"))


def test_a_yaml_alias_bomb_gives_a_short_message(tmp_path):
    text = "data: toy\nlr: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{k}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
        for i, k in enumerate(["intensity_shift", "blur_sigma", "registor_lr", "width", "registor_scale",
                               "toy_max_shift"], 1))  # toy_max_shift: 10**7 ones, checked first
    with pytest.raises(ConfigError, match=r"toy_max_shift: expected null or an int") as info:
        load_config(cfg(tmp_path, text))
    assert len(str(info.value)) < 400


def test_yes_no_booleans_crops_beyond_the_image_and_a_config_from_a_run(tmp_path):
    c = load_config(cfg(tmp_path, "data: toy\nprogress: no\nbf16: off\ncheckpointing: yes\n"))
    assert (c.progress, c.bf16, c.checkpointing) == (False, False, True)
    # a crop side larger than the image is the whole image (documented), not an error
    c = load_config(cfg(tmp_path, "data: toy\ntoy_size: 32\ncrop_min: 64\ncrop_max: 64\n"))
    item = {k: torch.zeros(1, 32, 32) for k in ("x1", "x2", "s1", "s2")}
    assert random_crop(item, *c.crop_bounds(), torch.Generator(), 0.0)["x1"].shape == (1, 32, 32)


def test_a_cuda_device_this_machine_lacks(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"device: expected cuda:0 \.\. cuda:0 on this machine \(1 CUDA device\), "
                                          r"got 'cuda:1'"):
        load_config(cfg(tmp_path, "data: toy\ndevice: cuda:1\n"))
    assert load_config(cfg(tmp_path, "data: toy\ndevice: cuda:0\n")).device == "cuda:0"


def test_a_tiny_toy_run_from_a_config_file(tmp_path):
    """The strict loader reads what --write-config writes and what a run stores."""
    path = cfg(tmp_path, "data: toy\n" + TINY + "steps_segmentor: 1\nsteps_registor: 1\nsteps_joint: 1\n"
                         "lr: 1e-3\nlambda_r: 0\nlambda_g: 0\n")
    train(load_config(path), tmp_path / "o")
    assert load_config(tmp_path / "o" / "config.yaml") == load_config(path)
