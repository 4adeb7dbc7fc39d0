"""The fused-vs-naive table: forward and forward+backward time, peak memory of
forward+backward, for every case in benchmarks/cases.py.

    python benchmarks/table.py [--device cpu|cuda] [--ops warp ...] [--quick] [--repeats N] [--ds-repeats N]

A second table ("D_S per pair", skipped by --quick; select it alone with
--ops "D_S per pair") times D_S(elastic) of one 256x256x128 pair with a /16 grid
by this version's optimizer and by the single-level one it replaced
(benchmarks/legacy_similarity.py of commit caff10b, loaded with `git show`; its row is
skipped, with the reason, without git or that commit), alternately in one process. A third
("translation search bounds", skipped by --quick; select it alone with --ops
"translation search bounds") times translation_search's methods at growing bounds
with their peak memory in input volumes. A fourth ("bspline ffd", CPU, skipped by --quick;
select it alone with --ops "bspline ffd") is benchmarks/bspline.py: cubic B-spline FFD of a
256x256x128 image by SimpleITK, TorchIO, deepali and coopseg.

Prints a Markdown table and appends the run (machine, torch version, commit, date, rows)
as one line to benchmarks/results.jsonl (--out: another file, or a folder's results.jsonl).
Ratios are naive / fused, from one run.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import coopseg_kernels as ck  # noqa: E402
import coopseg_kernels.similarity.translation as S  # noqa: E402
from benchmarks import bspline  # noqa: E402
from benchmarks.cases import (  # noqa: E402
    Case,
    all_cases,
    ds_optimizers,
    ds_pair,
    tsearch_bound_cases,  # noqa: E402
)
from benchmarks.harness import append_result, copy_bandwidth, machine, median_seconds, peak_bytes, sync  # noqa: E402
from coopseg_kernels import reference  # noqa: E402
from coopseg_kernels.similarity.naive import brute_force_translation  # noqa: E402

MiB = 1 << 20


def _with_grads(case: Case, inputs: dict) -> dict:
    return {k: (v.clone().requires_grad_() if k in case.grad_inputs else v) for k, v in inputs.items()}


def fwd_bwd(fn, x: dict, grad_out: torch.Tensor):
    """One forward+backward on leaf inputs x; their .grad is dropped first so
    that every run allocates (and is measured) the same way."""
    def run():
        for v in x.values():
            v.grad = None
        fn(x).backward(grad_out)
    return run


def measure(case: Case, device: torch.device, repeats: int) -> dict:
    inputs = case.make()
    with torch.no_grad():
        out = case.fused(inputs)
    row = {"op": case.op, "shape": case.shape}
    impls = {"naive": case.naive, "fused": case.fused, **case.others}
    for name, fn in impls.items():
        with torch.no_grad():
            row[f"fwd_ms_{name}"] = 1e3 * median_seconds(lambda: fn(inputs), device, repeats=repeats)
        if case.backward:
            run = fwd_bwd(fn, _with_grads(case, inputs), torch.rand_like(out))
            row[f"fwdbwd_ms_{name}"] = 1e3 * median_seconds(run, device, repeats=repeats)
        else:  # the peak of the computation itself
            def run(fn=fn):
                with torch.no_grad():
                    fn(inputs)
            row[f"fwdbwd_ms_{name}"] = float("nan")
        row[f"peak_mib_{name}"] = peak_bytes(run, device) / MiB
    row["fwd_speedup"] = row["fwd_ms_naive"] / row["fwd_ms_fused"]
    row["fwdbwd_speedup"] = row["fwdbwd_ms_naive"] / row["fwdbwd_ms_fused"]
    row["peak_ratio"] = row["peak_mib_fused"] / row["peak_mib_naive"]
    row["bytes_moved"] = case.bytes_moved(inputs)
    if case.compare:  # the outputs compared: largest difference, and how many voxels differ
        with torch.no_grad():
            diff = (case.fused(inputs).double() - case.naive(inputs).double()).abs()
        row["max_abs_diff"] = float(diff.max())
        row["voxels_differing"] = int((diff > 0).sum())
    return row


def markdown(rows: list[dict], info: dict, bandwidth: float | None) -> str:
    head = ("| op | shape | fwd naive ms | fwd fused ms | fwd × | fwd+bwd naive ms | fwd+bwd fused ms | fwd+bwd × "
            "| peak naive MiB | peak fused MiB | fused/naive peak |")
    # peak: of forward+backward, or of the computation itself where it has no backward (— columns)
    head += " other baselines |"
    if bandwidth:
        head += " fwd % copy BW |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def num(v, fmt):
        return "—" if v != v else format(v, fmt)
    for r in rows:
        line = (f"| {r['op']} | {r['shape']} | {r['fwd_ms_naive']:.1f} | {r['fwd_ms_fused']:.2f} | "
                f"{r['fwd_speedup']:.1f} | {num(r['fwdbwd_ms_naive'], '.1f')} | {num(r['fwdbwd_ms_fused'], '.2f')} | "
                f"{num(r['fwdbwd_speedup'], '.1f')} | {r['peak_mib_naive']:.1f} | {r['peak_mib_fused']:.3f} | "
                f"{r['peak_ratio']:.4f} |")
        others = [k[len("fwd_ms_"):] for k in r
                  if k.startswith("fwd_ms_") and k not in ("fwd_ms_naive", "fwd_ms_fused")]
        notes = [f"{n}: fwd {r['fwd_ms_' + n]:.1f} ms, fwd+bwd {num(r['fwdbwd_ms_' + n], '.1f')} ms, "
                 f"peak {r['peak_mib_' + n]:.1f} MiB" for n in others]
        if "max_abs_diff" in r:
            notes.append(f"max abs diff to naive {r['max_abs_diff']:.2g} ({r['voxels_differing']} voxels differ)")
        line += " " + "; ".join(notes) + " |"
        if bandwidth:
            line += f" {100 * r['bytes_moved'] / (r['fwd_ms_fused'] / 1e3) / bandwidth:.0f} |"
        lines.append(line)
    where = info.get("gpu", info["cpu"])
    lines.append(f"\n{where}, {info['cpu_threads']} CPU threads, torch {info['torch']}, {info['date']}")
    return "\n".join(lines)


DS_PAIR = "D_S per pair"


def ds_pair_rows(device: torch.device, repeats: int) -> list[dict]:
    """Seconds per pair of each D_S optimizer on the same 256x256x128 /16 pair, run
    alternately `repeats` times in this one process (median), with its steps and score;
    and the naive-autograd step (reference.similarity_step) per iteration on that pair."""
    s1, s2 = ds_pair(device)
    opts = {name: fn for name, fn in ds_optimizers().items() if fn is not None}  # None: not in this checkout
    times: dict[str, list[float]] = {k: [] for k in opts}
    facts: dict[str, tuple] = {}
    for _ in range(repeats):
        for name, fn in opts.items():
            sync(device)
            t0 = time.perf_counter()
            score, iters = fn(s1, s2)
            sync(device)
            times[name].append(time.perf_counter() - t0)
            facts[name] = (float(score[0]), int(iters[0]))
    rows = [{"optimizer": n, "seconds": statistics.median(t), "all_seconds": t, "iterations": facts[n][1],
             "score": facts[n][0]} for n, t in times.items()]
    s1b, s2b = ck.blur(s1.float()), ck.blur(s2.float())
    coarse = torch.zeros(1, 3, *ck.similarity.coarse_size_for(s1.shape[2:], 16), device=device)
    for name, fn in [("naive autograd (reference.similarity_step)", reference.similarity_step),
                     ("fused similarity_step", ck.similarity_step)]:
        ms = 1e3 * median_seconds(lambda fn=fn: fn(s1b, s2b, coarse), device, repeats=repeats)
        rows.append({"optimizer": name, "ms_per_iteration": ms})
    return rows


def ds_markdown(rows: list[dict]) -> str:
    lines = ["| D_S(elastic), 256x256x128 /16 pair | seconds per pair (median) | runs (s) | iterations | score "
             "| ms per iteration |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "seconds" in r:
            runs = ", ".join(f"{v:.2f}" for v in r["all_seconds"])
            lines.append(f"| {r['optimizer']} | {r['seconds']:.2f} | {runs} | {r['iterations']} | {r['score']:.4f} | |")
        else:
            lines.append(f"| {r['optimizer']} | | | | | {r['ms_per_iteration']:.1f} |")
    return "\n".join(lines)


TSEARCH = "translation search bounds"
BSPLINE = "bspline ffd"


def tsearch_rows(device: torch.device, repeats: int) -> list[dict]:
    """translation_search at growing bounds (benchmarks/cases.py: tsearch_bound_cases):
    method auto / direct / fft timed alternately `repeats` times in this one process (median),
    the peak of each in input volumes (one bool mask: its bytes), which method auto took, and
    brute-force slicing -- measured where it scores <= 343 shifts, else its time per shift
    measured on 27 shifts (bound 1) of the same masks times the shift count (extrapolated)."""
    rows = []
    for label, s1, s2, bound in tsearch_bound_cases(device):
        size = tuple(s1.shape[2:])
        shifts = math.prod(2 * (n - 1 if bound is None else min(bound, n - 1)) + 1 for n in size)
        volume = s1.numel() * s1.element_size()
        fns = {m: (lambda m=m: ck.translation_search(s1, s2, bound, method=m)) for m in ("auto", "direct", "fft")}
        brute_measured = bound is not None and shifts <= 343
        if brute_measured:
            fns["brute force"] = lambda: brute_force_translation(s1, s2, bound)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
        row = {"shape": label, "bound": "any" if bound is None else bound, "shifts": shifts,
               "volume_mib": volume / MiB}
        for name, t in times.items():
            row[f"ms_{name}"] = 1e3 * statistics.median(t)
        if not brute_measured:
            t1 = median_seconds(lambda: brute_force_translation(s1, s2, 1), device, repeats=1)
            row["ms_brute force"] = 1e3 * t1 / 27 * shifts
        row["brute_extrapolated"] = not brute_measured
        for name in ("auto", "direct", "fft"):
            row[f"volumes_{name}"] = peak_bytes(fns[name], device) / volume
        calls = []
        real_fft = S._overlap_fft
        S._overlap_fft = lambda *a: (calls.append(1), real_fft(*a))[1]
        try:
            fns["auto"]()
        finally:
            S._overlap_fft = real_fft
        row["auto_took"] = "fft" if calls else "direct"
        row["x_vs_brute"] = row["ms_brute force"] / row["ms_auto"]
        rows.append(row)
    return rows


def tsearch_markdown(rows: list[dict]) -> str:
    lines = ["| translation search | bound | shifts | auto took | auto ms | direct ms | fft ms | brute force ms "
             "| brute / auto | peak auto (volumes) | peak direct (volumes) | peak fft (volumes) | volume MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        brute = f"{r['ms_brute force']:.0f}" + (" (extrapolated)" if r["brute_extrapolated"] else "")
        lines.append(f"| {r['shape']} | {r['bound']} | {r['shifts']} | {r['auto_took']} | {r['ms_auto']:.1f} | "
                     f"{r['ms_direct']:.1f} | {r['ms_fft']:.1f} | {brute} | {r['x_vs_brute']:.0f} | "
                     f"{r['volumes_auto']:.2f} | {r['volumes_direct']:.2f} | {r['volumes_fft']:.2f} | "
                     f"{r['volume_mib']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ops", nargs="*", default=None, help="only these ops (default: all)")
    ap.add_argument("--quick", action="store_true", help="skip the largest shapes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ds-repeats", type=int, default=3, help="runs of each optimizer in the D_S-per-pair table")
    ap.add_argument("--ts-repeats", type=int, default=3, help="runs of each method in the translation-search table")
    ap.add_argument("--bspline-repeats", type=int, default=3, help="calls of each row in the B-spline FFD table")
    ap.add_argument("--out", default=None,
                    help="JSON-lines file to append the run to, or a folder (its results.jsonl); "
                         "default benchmarks/results.jsonl")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    info = machine(device)
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    rows = []
    cases = [c for c in all_cases(device, args.ops) if not (args.quick and c.big)]
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.op} {case.shape} ...", file=sys.stderr, flush=True)
        rows.append(measure(case, device, args.repeats))
    table = markdown(rows, info, bandwidth) if rows else ""
    ds_rows = []
    if not args.quick and (args.ops is None or DS_PAIR in args.ops):
        print(f"{DS_PAIR} 256x256x128 /16 ({args.ds_repeats} runs of each optimizer) ...", file=sys.stderr,
              flush=True)
        ds_rows = ds_pair_rows(device, args.ds_repeats)
        table += "\n\n" + ds_markdown(ds_rows)
        if not rows:
            table += (f"\n\n{info.get('gpu', info['cpu'])}, {info['cpu_threads']} CPU threads, "
                      f"torch {info['torch']}, {info['date']}")
    ts_rows = []
    if not args.quick and (args.ops is None or TSEARCH in args.ops):
        print(f"{TSEARCH} ({args.ts_repeats} runs of each method) ...", file=sys.stderr, flush=True)
        ts_rows = tsearch_rows(device, args.ts_repeats)
        table += "\n\n" + tsearch_markdown(ts_rows)
        if not rows and not ds_rows:
            table += (f"\n\n{info.get('gpu', info['cpu'])}, {info['cpu_threads']} CPU threads, "
                      f"torch {info['torch']}, {info['date']}")
    bs_rows = []
    if not args.quick and device.type == "cpu" and (args.ops is None or BSPLINE in args.ops):
        print(f"{BSPLINE} ({args.bspline_repeats} calls of each row, each in its own process) ...", file=sys.stderr,
              flush=True)
        bs_rows = bspline.rows(args.bspline_repeats, torch.get_num_threads())
        table += "\n\n" + bspline.markdown(bs_rows)
        if not rows and not ds_rows and not ts_rows:
            table += f"\n\n{info['cpu']}, {info['cpu_threads']} CPU threads, torch {info['torch']}, {info['date']}"
    print(table)
    path = append_result(args.out, __file__, argv, info, {
        "machine": info, "copy_bandwidth_bytes_per_s": bandwidth, "rows": rows, "ds_pair_rows": ds_rows,
        "tsearch_rows": ts_rows, "bspline_rows": bs_rows, "table": table})
    print(f"\nappended to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
