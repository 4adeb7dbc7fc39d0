"""Peak memory and time of one joint training step over growing cubic crops.

    python benchmarks/train_memory.py [--device cpu|cuda] [--crops 16 32 48] [--width 1.0]
                                      [--configs naive fused ...] [--budget-gib 4] [--breakdown 32]

One step = the cooperative forward (segmentor on both images, registor on the
detached probabilities), the three losses (lambda_r 0.1, lambda_g 1, lambda_p 1:
the paper's liver values) and the backward, 3-D, batch 1, elastic registor --
exactly what coopseg.train's joint stage does per step, without the optimizer
update. Parameter gradients and optimizer state are allocated before the step (as
in every step after the first; a warm-up step makes them) and are not counted, so
the count is what the step adds: activations, their gradients and the workspace
of the ops (plus, under autocast, the bf16 copies of the weights, a constant).

Configurations (each adds one thing, so a reader sees what each part buys):
  naive       losses through coopseg_kernels.reference (backend="reference"), fp32
  fused       fused warp/blur kernels (backend="auto")
  ckpt        activation checkpointing of the U-Net levels, reference ops
  fused+ckpt  both
  all         fused + checkpointing + bf16 autocast of the two networks' forward
              (cooperative_loss computes every term in fp32 on the outputs, as
              coopseg.train does; on CPU the C++ kernels take fp32/fp64 only;
              coopseg.train autocasts on CUDA only: on CPU this row measures the
              memory of the same dtypes, with oneDNN's bf16 convolutions)
  all+conv-ckpt  a proposal measured here: as all, but each conv+norm+ReLU
              of the segmentor is checkpointed instead of each U-Net level

Peak memory is the most tensor-storage bytes alive at once above what was live
before the step: counted with a TorchDispatchMode on CPU (benchmarks/memory.py;
it sees every tensor an op returns, autograd's too, not the scratch a kernel
(oneDNN conv, our C++ kernels) frees before returning), torch.cuda.max_memory_allocated
on GPU. Memory grows linearly with the voxels, peak = a + b * voxels: b (bytes
per voxel) is fitted on the two largest crops, and gives the largest cubic crop
(a multiple of 16) that fits a budget: the counted budget (--budget-gib, 4 GiB)
and 80 GiB projected. Time: median of --repeats steps after one warm-up, outside
the counting mode.

--breakdown N measures, at crop N, for naive, fused, ckpt and all, the bytes held
after each top-level module's forward, which tensors (op that made them,
dtype, shape) are alive at the peak, and the peak of each phase of the step
(each part's forward, recomputation and backward): where the memory goes.

Prints a Markdown table and appends the run as one line to benchmarks/results.jsonl
(--out: another file, or a folder's results.jsonl).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import append_result, machine, median_seconds  # noqa: E402
from benchmarks.memory import LiveStorageBytes, peak_bytes  # noqa: E402
from coopseg.losses import cooperative_loss  # noqa: E402
from coopseg.models import CooperativeNet, Registor, Segmentor  # noqa: E402
from coopseg.models.checkpointing import checkpointed  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30

# name -> (loss backend, checkpointing: False | "level" | "conv", bf16 autocast)
CONFIGS = {
    "naive": ("reference", False, False),
    "fused": ("auto", False, False),
    "ckpt": ("reference", "level", False),
    "fused+ckpt": ("auto", "level", False),
    "all": ("auto", "level", True),
    "all+conv-ckpt": ("auto", "conv", True),
}


class _PerConvCheckpoint(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *xs, **kwargs):  # an up level's ops[0] takes (x, skip, up=...), ops[1] head=...
        return checkpointed(self.inner, *xs, **kwargs)


def per_conv_checkpointing(net) -> None:
    """A proposal, measured here only (coopseg.models checkpoints whole U-Net
    levels): checkpoint each conv+norm+ReLU of the segmentor instead, so that the
    backward recomputes one conv's activations at a time, not a whole level's."""
    seg = net.segmentor
    seg.checkpointing = False  # the registor keeps its per-block checkpointing
    for m in list(seg.modules()):
        ops = getattr(m, "ops", None)
        if isinstance(ops, nn.Sequential):
            for i in range(len(ops)):
                ops[i] = _PerConvCheckpoint(ops[i])
LAMBDAS = dict(lambda_r=0.1, lambda_g=1.0, lambda_p=1.0)


def build(width: float, checkpointing, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    seg = Segmentor(spatial_dims=3, width=width)
    reg = Registor(spatial_dims=3, omega="elastic")
    net = CooperativeNet(seg, reg, checkpointing=bool(checkpointing))
    if checkpointing == "conv":
        per_conv_checkpointing(net)
    return net.to(device).train()


def make_batch(crop: int, device: torch.device, seed: int = 0) -> dict:
    """Images in [0, 1] and two related but different blob masks (batch 1)."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, 1, crop, crop, crop)
    ax = torch.linspace(-1, 1, crop)
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    s1 = ((zz ** 2 + yy ** 2 + (xx - 0.1) ** 2) < 0.4).float().reshape(shape)
    s2 = (((zz - 0.1) ** 2 + yy ** 2 + xx ** 2) < 0.35).float().reshape(shape)
    x1 = (0.6 * s1 + 0.4 * torch.rand(shape, generator=g)).clamp(0, 1)
    x2 = (0.6 * s2 + 0.4 * torch.rand(shape, generator=g)).clamp(0, 1)
    return {k: v.to(device) for k, v in dict(x1=x1, x2=x2, s1=s1, s2=s2).items()}


def step_fn(net, batch: dict, backend: str, bf16: bool, device: torch.device):
    """One joint step (forward, three losses, backward) as a closure."""
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())

    def run():  # the gradients exist before the step and accumulate (see the module doc)
        with amp:
            outputs = net(batch["x1"], batch["x2"])
        terms = cooperative_loss(outputs, batch["s1"], batch["s2"], backend=backend, **LAMBDAS)
        terms.total.backward()
        return terms
    return run


class StepBytes(LiveStorageBytes):
    """LiveStorageBytes that leaves out the storages of `existing` tensors (the
    parameters, their gradients, the BatchNorm buffers): in-place ops on them
    (gradient accumulation, running-statistics updates) return them, and the
    plain counter would count them as new the first time it sees them."""

    def __init__(self, existing=()):
        super().__init__()
        self._existing = {t.untyped_storage()._cdata for t in existing}

    def _track(self, t: torch.Tensor) -> None:
        if t.untyped_storage()._cdata not in self._existing:
            super()._track(t)


def existing_tensors(net) -> list[torch.Tensor]:
    return ([p for p in net.parameters()] + [p.grad for p in net.parameters() if p.grad is not None]
            + [b for b in net.buffers()])


def step_peak_bytes(run, net, device: torch.device) -> int:
    """Peak bytes of run() above what was live before it (CUDA: max_memory_allocated)."""
    if device.type == "cuda":
        return peak_bytes(run, device)
    with StepBytes(existing_tensors(net)) as mode:
        run()
    return mode.peak


class PeakSnapshot(StepBytes):
    """StepBytes that also remembers which op made each live storage and, at the
    peak, what was alive: the tensors that set the peak."""

    def __init__(self, existing=()):
        super().__init__(existing)
        self._what: dict[int, tuple[str, str, int]] = {}
        self.at_peak: list[tuple[str, str, int]] = []
        self._op = ""
        self.phase = ""  # set by breakdown's hooks: which part of the step is running
        self.phase_peaks: dict[str, int] = {}

    def _track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        if key in self._existing:
            return
        if key not in self._seen:
            self._what[key] = (self._op, f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}",
                               t.untyped_storage().nbytes())
        before = self.peak
        super()._track(t)
        if self.live > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = self.live
        if self.peak > before:
            self.at_peak = [self._what[k] for k in self._seen if k in self._what]

    def _release(self, key: int, n: int) -> None:
        super()._release(key, n)
        self._what.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = str(func.overloadpacket.__name__)
        return super().__torch_dispatch__(func, types, args, kwargs)

    def top(self, n: int = 12) -> list[tuple[str, int, int]]:
        """(op and shape, count, bytes) of the storages alive at the peak, largest first."""
        groups: dict[str, list[int]] = {}
        for op, shape, nb in self.at_peak:
            g = groups.setdefault(f"{op} -> {shape}", [0, 0])
            g[0] += 1
            g[1] += nb
        return sorted(((k, c, b) for k, (c, b) in groups.items()), key=lambda r: -r[2])[:n]


def breakdown(net, batch: dict, backend: str, bf16: bool) -> tuple[list[tuple[str, int]], list, dict]:
    """Bytes alive after each top-level module's forward (first call only, so
    checkpoint recomputation in the backward is not counted twice), after the
    losses, and the peak of the whole step: where the memory goes. Also the peak
    of each phase of the step: `fwd:<part>` runs from that part's forward on,
    `recompute:<part>` from its recomputation in the backward, `bwd:<part>` from
    the moment its output's gradient arrives (its backward), until the next label."""
    step_fn(net, batch, backend, bf16, batch["x1"].device)()  # allocates the parameter gradients
    mode = PeakSnapshot(existing_tensors(net))
    rows: list[tuple[str, int]] = []
    state = {"fwd": True}
    handles = []
    parts = []
    for top_name, top in net.named_children():
        for n, m in top.named_children() if list(top.children()) else [("", top)]:
            name = f"{top_name}.{n}" if n else top_name
            if isinstance(m, nn.ModuleList):  # e.g. the registor's blocks
                parts += [(f"{name}.{i}", b) for i, b in enumerate(m)]
            else:
                parts.append((name, m))
    seen: set[str] = set()

    def set_phase(phase):
        mode.phase = phase

    for name, mod in parts:
        def pre(_m, _i, name=name):
            set_phase(("fwd:" if state["fwd"] else "recompute:") + name)

        def hook(_m, _i, out, name=name):
            if state["fwd"] and name not in seen:
                seen.add(name)
                rows.append((name, mode.live))
                for o in (out if isinstance(out, tuple) else (out,)):
                    if isinstance(o, torch.Tensor) and o.requires_grad:
                        o.register_hook(lambda g, name=name: set_phase("bwd:" + name))
        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(hook))
    amp = torch.autocast(batch["x1"].device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    try:
        with mode:
            with amp:
                outputs = net(batch["x1"], batch["x2"])
            rows.append(("(network outputs)", mode.live))
            set_phase("fwd:losses")
            terms = cooperative_loss(outputs, batch["s1"], batch["s2"], backend=backend, **LAMBDAS)
            rows.append(("losses", mode.live))
            state["fwd"] = False
            set_phase("bwd:losses")
            terms.total.backward()
            rows.append(("after backward", mode.live))
    finally:
        for h in handles:
            h.remove()
    rows.append(("PEAK", mode.peak))
    return rows, mode.top(), dict(sorted(mode.phase_peaks.items(), key=lambda kv: -kv[1]))


def cubic_fit(crops: list[int], peaks: list[int]) -> tuple[float, float]:
    """peak = a + b * voxels from the two largest crops (the intercept holds
    parameter gradients and other constants)."""
    (c0, p0), (c1, p1) = sorted(zip(crops, peaks))[-2:]
    v0, v1 = c0 ** 3, c1 ** 3
    b = (p1 - p0) / (v1 - v0)
    return p1 - b * v1, b


def largest_crop(a: float, b: float, budget: float, multiple: int = 16) -> int:
    if b <= 0 or budget <= a:
        return 0
    c = int(((budget - a) / b) ** (1 / 3))
    return c // multiple * multiple


def measure(args, device: torch.device) -> dict:
    results = {}
    for name in args.configs:
        backend, ckpt, bf16 = CONFIGS[name]
        net = build(args.width, ckpt, device)
        rows = []
        for crop in args.crops:
            batch = make_batch(crop, device)
            run = step_fn(net, batch, backend, bf16, device)
            run()  # warm-up; allocates the parameter gradients
            peak = step_peak_bytes(run, net, device)
            sec = median_seconds(run, device, repeats=args.repeats, warmup=0)
            rows.append({"crop": crop, "voxels": crop ** 3, "peak_bytes": peak, "seconds": sec,
                         "bytes_per_voxel_total": peak / crop ** 3})
            print(f"  {name:18s} {crop:4d}^3  peak {peak / MiB:9.1f} MiB  {peak / crop ** 3:8.0f} B/voxel  "
                  f"{sec:7.2f} s", file=sys.stderr, flush=True)
            del batch, run
        entry = {"backend": backend, "checkpointing": ckpt, "bf16": bf16, "rows": rows}
        if len(rows) >= 2:
            a, b = cubic_fit([r["crop"] for r in rows], [r["peak_bytes"] for r in rows])
            entry.update(intercept_bytes=a, bytes_per_voxel=b,
                         largest_crop_budget=largest_crop(a, b, args.budget_gib * GiB),
                         voxels_at_budget=max(0.0, (args.budget_gib * GiB - a) / b),
                         largest_crop_80gib=largest_crop(a, b, 80 * GiB),
                         voxels_at_80gib=max(0.0, (80 * GiB - a) / b))
        results[name] = entry
        del net
    return results


def markdown(results: dict, args, info: dict) -> str:
    crops = args.crops
    head = "| config | " + " | ".join(f"{c}³ peak MiB | {c}³ s" for c in crops)
    head += (f" | bytes/voxel | largest crop in {args.budget_gib:g} GiB | largest crop in 80 GiB (projected) "
             "| voxels vs naive |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = results.get("naive", {}).get("voxels_at_budget")
    for name, e in results.items():
        cells = []
        for r in e["rows"]:
            cells += [f"{r['peak_bytes'] / MiB:.1f}", f"{r['seconds']:.2f}"]
        if "bytes_per_voxel" in e:
            ratio = f"{e['voxels_at_budget'] / base:.2f}×" if base else "—"
            tail = [f"{e['bytes_per_voxel']:.0f}", f"{e['largest_crop_budget']}³", f"{e['largest_crop_80gib']}³",
                    ratio]
        else:
            tail = ["—"] * 4
        lines.append(f"| {name} | " + " | ".join(cells + tail) + " |")
    lines.append("")
    lines.append(f"{info['cpu'] if info['device'] == 'cpu' else info.get('gpu')}, {info['cpu_threads']} threads, "
                 f"torch {info['torch']}, {info['date']}; segmentor width {args.width:g}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--crops", type=int, nargs="+", default=None,
                    help="cubic crop sizes, multiples of 16 (default: 16 32 48 on CPU, 64 96 128 160 on CUDA)")
    ap.add_argument("--width", type=float, default=1.0, help="segmentor width multiplier (1 = Models Genesis)")
    ap.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if c != "all+conv-ckpt"], choices=list(CONFIGS),
                    help="default: all but the all+conv-ckpt proposal")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--budget-gib", type=float, default=4.0)
    ap.add_argument("--breakdown", type=int, default=0, metavar="N", help="also list where the memory goes at crop N")
    ap.add_argument("--out", default=None,
                    help="JSON-lines file to append the run to, or a folder (its results.jsonl); "
                         "default benchmarks/results.jsonl")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.crops is None:
        args.crops = [16, 32, 48] if device.type == "cpu" else [64, 96, 128, 160]
    for c in args.crops:
        if c <= 0 or c % 16:
            ap.error(f"--crops: each crop must be a positive multiple of 16, got {c}")
    info = machine(device)
    t0 = time.perf_counter()
    results = measure(args, device)
    out = {"machine": info, "width": args.width, "crops": args.crops, "budget_gib": args.budget_gib,
           "lambdas": LAMBDAS, "configs": results}
    if args.breakdown:
        out["breakdown"] = {}
        for name in [n for n in ("naive", "fused", "ckpt", "all", "all+conv-ckpt") if n in args.configs]:
            backend, ckpt, bf16 = CONFIGS[name]
            net = build(args.width, ckpt, device)
            rows, top, phases = breakdown(net, make_batch(args.breakdown, device), backend, bf16)
            out["breakdown"][name] = {"crop": args.breakdown, "rows": rows, "alive_at_peak": top,
                                      "phase_peaks": phases}
            print(f"\nwhere the memory goes, {name}, {args.breakdown}^3 (MiB alive after each part's forward):")
            prev = 0
            for part, live in rows:
                print(f"  {part:40s} {live / MiB:9.1f}  (+{(live - prev) / MiB:.1f})")
                prev = live if part != "PEAK" else prev
            print("  alive at the peak, largest groups (op that made it -> dtype[shape], count, MiB):")
            for what, count, nb in top:
                print(f"    {what:60s} x{count:<3d} {nb / MiB:9.1f}")
            v = args.breakdown ** 3
            print(f"  peak of each phase of the step, largest first (MiB, bytes per voxel of {args.breakdown}^3):")
            for phase, nb in list(phases.items())[:8]:
                print(f"    {phase:45s} {nb / MiB:9.1f} {nb / v:8.0f}")
    out["seconds_total"] = time.perf_counter() - t0
    if "naive" in results and "all" in results and "voxels_at_budget" in results["all"]:
        ratio = results["all"]["voxels_at_budget"] / results["naive"]["voxels_at_budget"]
        out["all_vs_naive_voxels_at_budget"] = ratio
        out["all_vs_naive_bytes_per_voxel"] = results["naive"]["bytes_per_voxel"] / results["all"]["bytes_per_voxel"]
    table = markdown(results, args, info)
    print(table)
    if "all_vs_naive_voxels_at_budget" in out:
        print(f"\nall vs naive: {out['all_vs_naive_voxels_at_budget']:.2f}× the voxels in {args.budget_gib:g} GiB, "
              f"{out['all_vs_naive_bytes_per_voxel']:.2f}× fewer bytes/voxel (target ≥ 4×)")
    path = append_result(args.out, __file__, argv, info, out)
    print(f"appended to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
