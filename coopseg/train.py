"""Training of the cooperating networks (paper §2.2): model, data, loop and checkpoints in one
readable file (the config keys are in coopseg/config.py, the state on disk in coopseg/checkpoint.py).
About 500 lines on purpose: everything a run does is visible in one place (as nanoGPT's train.py).

    coopseg train --write-config CFG.yaml         # the documented defaults (they train on the toy data)
    coopseg train --config CFG.yaml --out DIR     # train; DIR/log.csv, DIR/last.pt, DIR/config.yaml
    coopseg train --config CFG.yaml --out DIR --resume
    torchrun --nproc_per_node N -m coopseg.cli train --config CFG.yaml --out DIR   # data parallel

Three stages, one step = one pair (batch 1) cropped to a random box:

    segmentor  L_r                              trains the segmentor
    registor   L_g on the *annotation* masks    trains the registor (input cat(s1, s2))
    joint      λ_r L_r + λ_g L_g + λ_p L_p      both, with the stop-gradients of coopseg.losses

One Adam optimizer holds every parameter; a stage only produces gradients for the
network it trains (the others' stay None, which Adam skips).

Reproducibility: every random draw of the loop (pair index, crop size and position,
intensity shift) comes from one torch.Generator; the checkpoint stores it with the
torch CPU/CUDA, numpy and python RNG states, the model and the optimizer, so that a
run stopped and resumed writes the same log.csv as an uninterrupted one (on CPU; the
seconds column aside). Checkpoints are written to a temporary file and renamed
(os.replace): a crash never leaves a half-written last.pt. SIGTERM / SIGINT finish the
current step, write the checkpoint and stop (exit status 128 + signal number).

--resume honours new step counts when the steps taken are the start of the new plan, and
refuses otherwise (and when log.csv is missing or damaged). A run holds OUT/.lock: a
second run into OUT is refused. A non-finite loss or weight stops training (Diverged; the
last checkpoint, finite, is kept). docs/training.md, "Checkpoints and resume".
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import coopseg_kernels as ck

from .checkpoint import (
    OutputError,
    atomic_write_text,
    check_finite,
    first_nonfinite,
    folder_lock,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import CROP_MULTIPLE, Config, load_config, write_default_config  # noqa: F401 (re-exported)
from .data import build_dataset
from .errors import CheckpointError, ConfigError, CoopsegError
from .losses import blur_kernel, cooperative_loss, inside_mask, registration_loss, segmentation_loss
from .models import CooperativeNet, Registor, Segmentor, ToyUNet, load_genesis

STAGES = ("segmentor", "registor", "joint")
LOG_HEADER = ["step", "stage", "total", "seg", "reg", "sim", "seconds"]
RESUME_KEYS = ("model", "optimizer", "stage", "step", "rng", "config", "stages", "world_size")


class Interrupted(Exception):
    """Training stopped by SIGTERM/SIGINT after writing its checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; "
                         f"checkpoint {checkpoint} (continue with --resume)")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class Diverged(CoopsegError):
    """A non-finite loss or parameter: training stopped, the last checkpoint (finite) kept."""


# ----------------------------------------------------------------------------- model

def build_model(config: Config) -> CooperativeNet:
    """The CooperativeNet described by `config` (freshly initialised from torch's RNG;
    the segmentor from Models Genesis weights if config.genesis is set)."""
    if config.segmentor == "unet":
        seg = ToyUNet(in_channels=2, out_channels=2, width=config.width, levels=config.unet_levels,
                      norm=config.norm, context=config.unet_context, coords=config.unet_coords)
    else:
        seg = Segmentor(config.spatial_dims, in_channels=2, out_channels=2, width=config.width, norm=config.norm)
    if config.genesis:
        load_genesis(seg, config.genesis)
    reg = Registor(config.spatial_dims, omega=config.omega, in_channels=2, scale=config.registor_scale,
                   pool=config.registor_pool)
    return CooperativeNet(seg, reg, checkpointing=config.checkpointing)


def load_model(checkpoint_path, map_location="cpu") -> tuple[CooperativeNet, Config]:
    """(model in eval mode, its Config) from a training checkpoint (weights_only=True).
    CheckpointError naming the file when it is not a coopseg checkpoint, does not fit the
    model its config describes, or holds a NaN / inf (naming the first such parameter)."""
    ckpt = load_checkpoint(checkpoint_path, map_location)
    config = Config.from_dict(ckpt["config"], source=f"{checkpoint_path} (config)")
    check_finite(ckpt["model"], checkpoint_path)
    model = build_model(dataclasses.replace(config, genesis=""))
    _load_state(model, ckpt["model"], checkpoint_path)
    return model.eval(), config


def _load_state(module, state: dict, path) -> None:
    try:
        module.load_state_dict(state)
    except Exception as exc:  # missing / unexpected keys, shape mismatch (RuntimeError), bad values
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path}: its weights do not fit the model its config describes "
                              f"({first if len(first) > 60 else detail})") from None


# ----------------------------------------------------------------------------- data

def random_crop(sample: dict, crop_min, crop_max, gen: torch.Generator, shift: float) -> dict:
    """A random box of the pair (same box in both images: they share a grid).

    The volume is first zero-padded at the end of each axis to a multiple of 16; each
    side is then 16·k drawn uniformly within [crop_min, crop_max] (clamped to the
    volume), so sizes and aspect ratios vary; the position is uniform. Each image then
    gets its own intensity shift U(-shift, shift). Draws come from `gen` only.
    """
    x = torch.cat([sample[k] for k in ("x1", "x2", "s1", "s2")], 0)
    pad = []
    for n in reversed(x.shape[1:]):
        pad += [0, -n % CROP_MULTIPLE if n >= CROP_MULTIPLE else CROP_MULTIPLE - n]
    if any(pad):
        x = torch.nn.functional.pad(x, pad)
    box = []
    for n, lo, hi in zip(x.shape[1:], crop_min, crop_max):
        hi_k = min(hi, n) // CROP_MULTIPLE
        lo_k = min(lo // CROP_MULTIPLE, hi_k)
        side = CROP_MULTIPLE * int(torch.randint(lo_k, hi_k + 1, (), generator=gen))
        start = int(torch.randint(0, n - side + 1, (), generator=gen))
        box.append(slice(start, start + side))
    x = x[(slice(None), *box)]
    u = (torch.rand(2, generator=gen) * 2 - 1) * shift
    return dict(x1=x[0:1] + u[0], x2=x[1:2] + u[1], s1=x[2:3], s2=x[3:4])


def build_training_data(config: Config):
    if config.data == "toy":
        return build_dataset("toy", spatial_dims=2, seed=config.seed, split="train", n=config.toy_pairs,
                             size=config.toy_size, max_shift=config.toy_max_shift, target=config.toy_target)
    return build_dataset(config.data, spatial_dims=config.spatial_dims, seed=config.seed, split="train")


def _read_log(path: Path, expected: list[str], ckpt_path: Path) -> list[list[str]]:
    """The rows of log.csv for the steps the checkpoint has seen (their stages `expected`),
    or CheckpointError: a resume never continues with rows silently gone. Rows beyond the
    checkpoint (a crash between the log and the checkpoint) are dropped."""
    upto = len(expected)
    if upto == 0:
        return []
    advice = f"restore it, or start again in a new --out (the losses of steps 1-{upto} are not in the checkpoint)"
    try:
        text = path.read_text(encoding="utf-8-sig")  # (a byte-order mark from an editor is fine)
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing, but {ckpt_path} is at step {upto}: the log cannot be "
                              f"continued without its first {upto} rows; {advice}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}); {advice}") from None
    if not rows or rows[0] != LOG_HEADER:
        raise CheckpointError(f"{path}: damaged (first line is not the header {','.join(LOG_HEADER)}); {advice}")
    for i, (row, stage) in enumerate(zip(rows[1:upto + 1], expected), 1):
        if len(row) != len(LOG_HEADER) or row[0] != str(i) or row[1] != stage:
            raise CheckpointError(f"{path}: damaged at line {i + 1} (expected the row of step {i}, {stage}, "
                                  f"got {','.join(row)[:80]!r}); {advice}")
    if len(rows) - 1 < upto:
        raise CheckpointError(f"{path}: has {len(rows) - 1} rows, but {ckpt_path} is at step {upto}: "
                              f"rows are missing; {advice}")
    return rows[1:upto + 1]


# ----------------------------------------------------------------------------- distributed

def _setup_distributed(config: Config):
    """(rank, world_size, device). torchrun sets WORLD_SIZE; then gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = config.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config: device: expected auto or cpu on this machine (no CUDA), got {config.device!r}")
    if world == 1:
        return 0, 1, torch.device(want)
    if want.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


# ----------------------------------------------------------------------------- the loop

def train(config: Config, out_dir, *, resume: bool = False, stages=STAGES, init_checkpoint=None,
          stop_after: int | None = None, overwrite: bool = True) -> Path:
    """Train and return the path of the final checkpoint (OUT/last.pt).

    stages:          which of "segmentor", "registor", "joint" to run, in that order
                     (steps are numbered 1.. over the stages run).
    init_checkpoint: start the model from this checkpoint's weights (fresh optimizer),
                     e.g. stages 1-2 trained once and shared by several joint runs.
    resume:          continue OUT/last.pt (same config; checkpoint_every, progress, device
                     may differ, and steps_* where the steps already done are a start of
                     the new plan: see _plan_done); without a checkpoint, start afresh.
    stop_after:      stop (with a checkpoint) after this many steps in this call.
    overwrite:       without resume, False refuses an OUT that holds a checkpoint.
    The run holds OUT/.lock (coopseg.checkpoint.folder_lock): a second run into OUT
    gets OutputError. Raises Interrupted after SIGTERM/SIGINT (checkpoint written) and
    Diverged on a non-finite loss or weight (the last checkpoint, finite, kept).
    """
    if not isinstance(config, Config):
        raise TypeError(f"config must be a coopseg.train.Config, got {type(config).__name__}")
    config.validate()
    stages = tuple(stages)
    if not stages or any(s not in STAGES for s in stages) or list(stages) != sorted(stages, key=STAGES.index) \
            or len(set(stages)) != len(stages):
        raise ValueError(f"stages must be a non-empty ordered subset of {STAGES}, got {stages!r}")
    out = Path(out_dir)
    rank, world, device = _setup_distributed(config)
    main = rank == 0
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
    with folder_lock(out, "coopseg train") if main else contextlib.nullcontext():
        if main:
            remove_stale_temporaries(out)  # left by a killed write (the lock says no run is writing here)
            if not resume and not overwrite and os.path.lexists(out / "last.pt"):
                raise OutputError(f"{out / 'last.pt'} exists: pass --resume to continue it, or choose another --out")
        return _train(config, out, rank, world, device, resume=resume, stages=stages,
                      init_checkpoint=init_checkpoint, stop_after=stop_after)


def _train(config: Config, out: Path, rank: int, world: int, device: torch.device, *, resume, stages,
           init_checkpoint, stop_after) -> Path:
    main = rank == 0
    ckpt_path, log_path = out / "last.pt", out / "log.csv"

    # Everything random below starts from the seed; resume then overwrites it all.
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed * 1000 + rank)
    model = build_model(config).to(device)
    optimizer = torch.optim.Adam([dict(params=model.segmentor.parameters()),
                                  dict(params=model.registor.parameters(), lr=config.registor_lr or config.lr)],
                                 lr=config.lr)
    dataset = build_training_data(config)
    plan = [(s, getattr(config, f"steps_{s}")) for s in stages]
    total_steps = sum(n for _, n in plan)
    done = {s: 0 for s in stages}  # steps taken per stage
    step = 0
    saved = None  # the step of the checkpoint on disk (None: none yet)

    if resume and os.path.lexists(ckpt_path):  # (a broken link is an error, not "no checkpoint")
        ckpt = load_checkpoint(ckpt_path, device, keys=RESUME_KEYS)
        _check_resumable(ckpt, config, stages, world, ckpt_path)
        done = _plan_done(ckpt, plan, ckpt_path)
        step = saved = ckpt["step"]
        rows = _read_log(log_path, [s for s, _ in plan for _ in range(done[s])], ckpt_path) if main else []
        check_finite(ckpt["model"], ckpt_path)
        _load_state(model, ckpt["model"], ckpt_path)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            set_rng_state(ckpt["rng"][rank], gen)
        except Exception as exc:  # a damaged or hand-made checkpoint: several types
            raise CheckpointError(f"{ckpt_path}: its optimizer or RNG state does not load "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
                                  ) from None
        if main:
            print(f"coopseg train: resuming {ckpt_path} after step {step} ({ckpt['stage']})", file=sys.stderr)
    else:
        if resume and main:
            print(f"coopseg train: no {ckpt_path} to resume; starting afresh", file=sys.stderr)
        if init_checkpoint is not None:
            init = load_checkpoint(init_checkpoint, device, keys=("model",))
            check_finite(init["model"], init_checkpoint)
            _load_state(model, init["model"], init_checkpoint)
        rows = []
    if main:  # the log holds exactly the steps the checkpoint has seen
        atomic_write_text(log_path, ",".join(LOG_HEADER) + "\n" + "".join(",".join(r) + "\n" for r in rows))
        atomic_write_text(out / "config.yaml", _config_yaml(config))

    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16 and device.type == "cuda")
    crop_min, crop_max = config.crop_bounds()
    kernel = blur_kernel(config.blur_sigma)  # L_g's blur
    wrapped = {}  # stage -> the module that runs its forward (DDP-wrapped under torchrun)

    def runner(stage):
        if stage not in wrapped:
            wrapped.clear()  # drop the previous stage's DDP reducer
            module = {"segmentor": model.segmentor, "registor": model.registor, "joint": model}[stage]
            if world > 1:
                module = torch.nn.parallel.DistributedDataParallel(
                    module, device_ids=[device.index] if device.type == "cuda" else None)
            wrapped[stage] = module
        return wrapped[stage]

    def one_step(stage) -> tuple[dict, bool]:
        """The loss terms of one step and whether they are finite (on every rank); the
        optimizer steps only when they are."""
        sample = random_crop(dataset[int(torch.randint(len(dataset), (), generator=gen))],
                             crop_min, crop_max, gen, config.intensity_shift)
        x1, x2, s1, s2 = (sample[k][None].to(device, non_blocking=True) for k in ("x1", "x2", "s1", "s2"))
        net = runner(stage)
        with torch.autocast(**autocast):
            if stage == "segmentor":
                logits = net(torch.cat((x1, x2), 1))
                seg = segmentation_loss(logits[:, 0:1], logits[:, 1:2], s1, s2)
                terms = dict(total=seg, seg=seg)
            elif stage == "registor":
                coarse = net(torch.cat((s1, s2), 1)).float()
                inside = inside_mask(coarse, s1.shape[2:], backend=config.backend) if config.inside_only else None
                reg = registration_loss(ck.warp(s1, coarse, backend=config.backend), s2, kernel=kernel,
                                        backend=config.backend, inside=inside)
                terms = dict(total=reg, reg=reg)
            else:
                t = cooperative_loss(net(x1, x2), s1, s2, lambda_r=config.lambda_r, lambda_g=config.lambda_g,
                                     lambda_p=config.lambda_p, backend=config.backend,
                                     sim_to_s1=config.sim_to_s1, sim_to_registor=config.sim_to_registor,
                                     kernel=kernel, inside_only=config.inside_only)
                terms = t._asdict()
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()  # also when not finite: under DDP every rank joins the all-reduce
        values = {k: float(v.detach()) for k, v in terms.items()}
        finite = math.isfinite(values["total"])
        if world > 1:
            flag = torch.tensor([float(not finite)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            finite = not flag.item()
        if finite:
            optimizer.step()
        return values, finite

    def kept() -> str:
        return f"{ckpt_path} (step {saved}) is kept" if saved is not None else "no checkpoint was written"

    def checkpoint(stage):
        bad = first_nonfinite(model.state_dict())
        if bad is not None:  # every rank holds the same weights: all stop here
            raise Diverged(f"after step {step} ({stage}) parameter {bad!r} is not finite (NaN or inf): training "
                           f"stopped, {kept()}; lower lr (now {config.lr:g}) and start again")
        states = [rng_state(gen)]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, rng_state(gen))
        if main:
            save_checkpoint(ckpt_path, dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                            stage=stage, step=step, rng=states, config=config.to_dict(),
                                            stages=list(stages), world_size=world, done=dict(done)))

    # SIGTERM / SIGINT: finish the step, checkpoint, stop (all ranks at the same step).
    caught = []
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
        except ValueError:  # not the main thread: leave signals alone
            pass

    bar = None
    if config.progress and main:
        bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr,
                   mininterval=0.5)
    model.train()
    try:
        log = open(log_path, "a", newline="") if main else None
    except OSError as exc:
        raise OutputError(f"cannot write {log_path}: {exc.strerror or exc}") from None
    # the stage of the last step taken
    last_stage = next((s for s, _ in reversed(plan) if done[s]), plan[0][0])
    try:
        steps_this_call = 0
        for stage, n in plan:
            for _ in range(done[stage], n):
                t0 = time.perf_counter()
                terms, finite = one_step(stage)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - t0
                step += 1
                if main:
                    try:
                        log.write(",".join([str(step), stage] + [
                            repr(terms[key]) if key in terms else "" for key in ("total", "seg", "reg", "sim")]
                            + [f"{seconds:.4f}"]) + "\n")
                        log.flush()
                    except OSError as exc:
                        raise OutputError(f"cannot write {log_path}: {exc.strerror or exc}; "
                                          f"{kept()}, continue with --resume") from None
                if not finite:
                    raise Diverged(f"step {step} ({stage}): the loss is not finite ("
                                   + ", ".join(f"{k} {v!r}" for k, v in terms.items())
                                   + f"): training stopped before its update, {kept()}; "
                                   f"lower lr (now {config.lr:g}) and start again")
                done[stage] += 1
                last_stage = stage
                steps_this_call += 1
                if bar is not None:
                    bar.set_postfix({"stage": stage, **{key: f"{v:.4f}" for key, v in terms.items()}})
                    bar.update(1)
                stop = bool(caught) or (stop_after is not None and steps_this_call >= stop_after)
                if world > 1:
                    flag = torch.tensor([float(stop)], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stop = bool(flag.item())
                if stop or step % config.checkpoint_every == 0:
                    checkpoint(stage)
                    saved = step
                if stop:
                    if caught:
                        raise Interrupted(caught[0], step, ckpt_path)
                    return ckpt_path
        if not (steps_this_call and saved == step):  # (a resume with nothing left records the new config)
            checkpoint(last_stage)
        return ckpt_path
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        wrapped.clear()


def _plan_done(ckpt: dict, plan: list, path: Path) -> dict:
    """Steps done per stage by the checkpoint, checked against the plan of this call.

    A resume honours new steps_* exactly as a fresh run with them would continue: the
    steps done must be a start of the new plan (every stage before the current one
    complete with its new count, the current one at most its new count). Anything else
    (fewer steps than done, or steps added to a stage already left) is refused."""
    stages = [s for s, _ in plan]
    done = ckpt.get("done")
    if done is None:  # written before "done" was stored: from the checkpoint's own plan
        done, left = {}, int(ckpt["step"])
        for s in stages:
            n = min(left, int(ckpt["config"].get(f"steps_{s}", 0)))
            done[s], left = n, left - n
        if left:
            raise CheckpointError(f"{path}: step {ckpt['step']} is beyond its config's steps")
    if not isinstance(done, dict) or set(done) != set(stages) or sum(done.values()) != ckpt["step"]:
        raise CheckpointError(f"{path}: damaged progress record ({done!r} at step {ckpt['step']})")
    current = max((i for i, s in enumerate(stages) if done[s]), default=0)
    for i, (s, n) in enumerate(plan):
        if i < current and done[s] != n:
            raise CheckpointError(
                f"{path}: its run finished the {s} stage after {done[s]} steps and went on to the "
                f"{stages[current]} stage; steps_{s} is now {n}: a resume cannot change a stage already left "
                f"(set steps_{s}: {done[s]}, or start again in a new --out)")
        if i == current and done[s] > n:
            raise CheckpointError(
                f"{path}: {done[s]} {s} steps are done, steps_{s} is now {n}: a resume cannot undo steps "
                f"(set steps_{s} >= {done[s]}, or start again in a new --out)")
    return {s: int(done[s]) for s in stages}


def _check_resumable(ckpt: dict, config: Config, stages, world: int, path: Path) -> None:
    free = {"steps_segmentor", "steps_registor", "steps_joint", "checkpoint_every", "progress", "device"}
    old = ckpt["config"]
    if not isinstance(old, dict):
        raise CheckpointError(f"{path}: not a coopseg training checkpoint (its 'config' is not a mapping)")
    diff = [k for k, v in config.to_dict().items() if k not in free and old.get(k) != v]
    if diff:
        raise ConfigError(f"{path} was written with another config: {', '.join(diff)} differ "
                          f"(e.g. {diff[0]}: {old.get(diff[0])!r} there, {getattr(config, diff[0])!r} now)")
    if list(stages) != ckpt["stages"]:
        raise CheckpointError(f"{path} was written with stages={ckpt['stages']}, resuming with stages={list(stages)}")
    if ckpt["world_size"] != world:
        raise CheckpointError(f"{path} was written by {ckpt['world_size']} processes; resume with as many, not {world}")
    if not isinstance(ckpt["step"], int) or ckpt["step"] < 0 or not isinstance(ckpt["rng"], list) \
            or len(ckpt["rng"]) != world:
        raise CheckpointError(f"{path}: damaged (step {ckpt['step']!r}, {type(ckpt['rng']).__name__} rng)")


def _config_yaml(config: Config) -> str:
    import yaml  # lazy on purpose

    return yaml.safe_dump(config.to_dict(), sort_keys=False)

