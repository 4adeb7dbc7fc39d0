"""Cost of the deterministic image gradient (triton/warp_gather.py) against the atomic
scatter: the raw Triton backward of the coarse warp (a 1/16 grid) and of the dense warp (a
full-resolution field), image gradient alone and with the field's, bilinear and nearest,
zeros padding, one fp32 channel at 256x256x128 (--size).

    python benchmarks/deterministic.py [--device cuda|cpu] [--size 256 256 128] [--repeats 10] [--out FILE|DIR]

Median time (CUDA events, after 2 warm-ups) of each backward with deterministic=False and
True, their ratio, and two checks per case: the deterministic image gradient is bitwise
equal from run to run, and it matches the atomic one (fp32 rounding, relative to the largest
value). `make gpu-check` runs it; on CPU (under TRITON_INTERPRET=1, a small --size) it is a
dry run of the code path whose times mean nothing. Appends the run to
benchmarks/results.jsonl (--out: another file, or a folder's results.jsonl).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bandwidth import parse_args, time_ms  # noqa: E402
from benchmarks.harness import append_result, machine  # noqa: E402
from coopseg_kernels import triton as kt  # noqa: E402


def cases(device: torch.device, size):
    """(name, backward(deterministic) -> (grad_image, grad_field)) per case."""
    nd = len(size)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, *size, generator=g).to(device)
    gout = torch.randn(1, 1, *size, generator=g).to(device)
    coarse = (torch.randn(1, nd, *[max(1, n // 16) for n in size], generator=g) * 3).to(device)
    # a smooth full-resolution field (the /16 grid upsampled) plus noise of 0.5 voxel
    ddf = F.interpolate(coarse, size=list(size), mode="bilinear" if nd == 2 else "trilinear", align_corners=True)
    ddf = (ddf + 0.5 * torch.randn(ddf.shape, generator=g).to(device)).contiguous()
    out = []
    for mode in ("bilinear", "nearest"):
        for both in (False, True):
            what = "image + field grads" if both and mode == "bilinear" else "image grad"
            if both and mode == "nearest":
                continue  # nearest gives the field no gradient
            out.append((f"warp_bwd /16 grid, {mode}, {what}",
                        lambda det, mode=mode, both=both: kt.warp_bwd(gout, x, coarse, True, "zeros", mode, True, both,
                                                                      det)))
            out.append((f"warp_dense_bwd, {mode}, {what}",
                        lambda det, mode=mode, both=both: kt.warp_dense_bwd(gout, x, ddf, "zeros", mode, True, both,
                                                                            det)))
    return out


def measure(device: torch.device, size, repeats: int) -> dict:
    rows = []
    for name, fn in cases(device, size):
        warmup = 2 if device.type == "cuda" else 0  # CPU: the interpreted dry run
        atomic_ms = time_ms(lambda: fn(False), device, repeats=repeats, warmup=warmup)
        det_ms = time_ms(lambda: fn(True), device, repeats=repeats, warmup=warmup)
        a, b, c = fn(False)[0], fn(True)[0], fn(True)[0]
        err = float((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-30))
        rows.append({"case": name, "atomic_ms": atomic_ms, "deterministic_ms": det_ms, "ratio": det_ms / atomic_ms,
                     "bitwise_repeatable": bool(torch.equal(b, c)), "max_rel_diff_vs_atomic": err})
    return {"machine": machine(device), "size": list(size), "dtype": "float32", "rows": rows}


def markdown(res: dict) -> str:
    m = res["machine"]
    where = m.get("gpu", m["cpu"])
    lines = [f"| backward (triton, {'x'.join(map(str, res['size']))}, fp32, C=1, zeros) | atomic ms | "
             "deterministic ms | ratio | bitwise repeatable | max rel. diff vs atomic |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['case']} | {r['atomic_ms']:.3f} | {r['deterministic_ms']:.3f} | {r['ratio']:.2f} | "
                     f"{'yes' if r['bitwise_repeatable'] else 'NO'} | {r['max_rel_diff_vs_atomic']:.1e} |")
    lines.append(f"\n{where}, torch {m['torch']}, triton {m.get('triton', '-')}, {m['date']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(__doc__, argv)
    res = measure(torch.device(args.device), args.size, args.repeats)
    text = markdown(res)
    print(text)
    path = append_result(args.out, __file__, argv, res["machine"], {**res, "table": text})
    print(f"\nappended to {path}", file=sys.stderr)
    ok = all(r["bitwise_repeatable"] and r["max_rel_diff_vs_atomic"] < 1e-4 for r in res["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
