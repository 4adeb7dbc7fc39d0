"""Achieved memory bandwidth of each fused kernel against the device's copy
bandwidth (the practical ceiling of a memory-bound kernel).

    python benchmarks/bandwidth.py [--device cuda|cpu] [--size 256 256 128] [--out FILE|DIR]

Copy bandwidth: `dst.copy_(src)` of a large fp32 tensor (1 GiB on CUDA, 256 MiB
on CPU), counted as read + write, timed with CUDA events (CPU: perf_counter),
median of 10 after 2 warm-ups. Each kernel is called through the backend the
public API picks for the device (Triton on CUDA, C++ on CPU), raw (no autograd),
on one fp32 channel, and credited with the minimal traffic of its job: every
full-size tensor it must read or write once (the coarse grid and tables are
negligible). Achieved bytes/s = that traffic / median time; % = of the copy
bandwidth. Kernels that move more than the minimum by design (the blur's one
pass per axis through a temporary: 2*nd volumes instead of 2; the image
gradient's atomic read-modify-write) show it as a lower %.

Device-generic so the code path can be dry-run on CPU; the figures that matter
come from `make gpu-check`. Appends the run as one line to benchmarks/results.jsonl
(--out: another file, or a folder's results.jsonl).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import append_result, machine  # noqa: E402
from coopseg_kernels import _backend  # noqa: E402
from coopseg_kernels.ops.blur import axis_tables as blur_tables  # noqa: E402


def time_ms(fn, device: torch.device, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of fn() in ms: CUDA events on CUDA, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Device copy bandwidth in bytes/s, counting read + write."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms / 1e3)


def kernel_cases(device: torch.device, size, dtype=torch.float32):
    """(name, callable, minimal bytes) of every raw kernel the public ops use."""
    be = _backend.resolve("auto", device)
    if be == "reference":
        raise SystemExit(f"no fused kernel for {device} (backend {be!r}): build the C++ extension or use CUDA")
    k = lambda name: _backend.kernel(name, be)  # noqa: E731
    nd = len(size)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, *size, generator=g).to(device=device, dtype=dtype)
    y = torch.rand(1, 1, *size, generator=g).to(device=device, dtype=dtype)
    coarse = (torch.randn(1, nd, *[max(1, n // 16) for n in size], generator=g) * 3).to(device=device, dtype=dtype)
    field_grad = torch.rand(1, nd, *size, generator=g).to(device=device, dtype=dtype)
    vol = x.numel() * x.element_size()
    idx, wt = blur_tables(size, (1.0, 2.0, 1.0), "zeros", False, dtype, device)
    cs = list(coarse.shape[2:])
    return be, [
        ("warp_fwd", lambda: k("warp_fwd")(x, coarse, True, "zeros", "bilinear"), 2 * vol),
        ("warp_bwd (image + coarse grads)",
         lambda: k("warp_bwd")(y, x, coarse, True, "zeros", "bilinear", True, True), 3 * vol),
        ("warp_bwd (coarse grad)",
         lambda: k("warp_bwd")(y, x, coarse, True, "zeros", "bilinear", False, True), 2 * vol),
        ("upsample_field_fwd", lambda: k("upsample_field_fwd")(coarse, list(size), True), nd * vol),
        ("upsample_field_bwd", lambda: k("upsample_field_bwd")(field_grad, cs, True), nd * vol),
        ("similarity_step_fwd (D_S step)", lambda: k("similarity_step_fwd")(x, y, coarse, True), 2 * vol),
        ("blur_apply [1,2,1]", lambda: k("blur_apply")(x, idx, wt), 2 * vol),
    ]


def measure(device: torch.device, size, repeats: int) -> dict:
    info = machine(device)
    bw = copy_bandwidth(device)
    be, cases = kernel_cases(device, size)
    rows = []
    for name, fn, nbytes in cases:
        ms = time_ms(fn, device, repeats=repeats)
        rows.append({"kernel": name, "bytes": nbytes, "ms": ms, "bytes_per_s": nbytes / (ms / 1e3),
                     "pct_of_copy": 100 * nbytes / (ms / 1e3) / bw})
    return {"machine": info, "backend": be, "size": list(size), "dtype": "float32",
            "copy_bandwidth_bytes_per_s": bw, "rows": rows}


def markdown(res: dict) -> str:
    GB = 1e9
    where = res["machine"].get("gpu", res["machine"]["cpu"])
    lines = [f"Copy bandwidth (read + write): {res['copy_bandwidth_bytes_per_s'] / GB:.1f} GB/s on {where}",
             "", f"| kernel ({res['backend']}, {'x'.join(map(str, res['size']))}, fp32, C=1) | minimal bytes MB "
             "| median ms | achieved GB/s | % of copy |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['kernel']} | {r['bytes'] / 1e6:.1f} | {r['ms']:.3f} | {r['bytes_per_s'] / GB:.1f} "
                     f"| {r['pct_of_copy']:.0f} |")
    m = res["machine"]
    lines.append(f"\n{where}, torch {m['torch']}, triton {m.get('triton', '-')}, {m['date']}")
    return "\n".join(lines)


def parse_args(doc: str, argv=None) -> argparse.Namespace:
    """The options of the device benchmarks (this one, deterministic.py): --device, --size,
    --repeats, --out."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, nargs="+", default=[256, 256, 128])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None,
                    help="JSON-lines file to append the run to, or a folder (its results.jsonl); "
                         "default benchmarks/results.jsonl")
    args = ap.parse_args(argv)
    if len(args.size) not in (2, 3):
        ap.error("--size takes 2 or 3 ints")
    return args


def main(argv=None) -> int:
    args = parse_args(__doc__, argv)
    device = torch.device(args.device)
    res = measure(device, args.size, args.repeats)
    text = markdown(res)
    print(text)
    path = append_result(args.out, __file__, argv, res["machine"], {**res, "table": text})
    print(f"\nappended to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
