"""The cubic B-spline FFD table: one 256x256x128 float32 image deformed by a cubic B-spline
control grid, by SimpleITK, TorchIO, deepali and coopseg, with its time, peak memory and
output against the others.

    python benchmarks/bspline.py [--repeats N] [--threads 2] [--out FILE]   # also part of `make bench`

Grids: TorchIO's default of 7 control points per axis (num_control_points=7, ITK mesh 4x4x4)
and a 1/16 grid (mesh S/16: 19x19x11 control points); control points drawn by TorchIO's
RandomElasticDeformation.get_params (max_displacement 7.5 mm, locked_borders 2, torch seed 1),
the image U(0, 1) (torch seed 0), 1 mm isotropic, identity affine. Rows:

- SimpleITK: sitk.ResampleImageFilter.Execute as TorchIO configures it (linear, default pixel
  value the image's minimum, float32 output) with its own threads (`--threads`); the image and
  the BSplineTransform are built before the clock starts.
- TorchIO: tio.ElasticDeformation(control_points, max_displacement)(subject), the whole
  transform as a data loader calls it (copy of the subject, SimpleITK round trip).
- coopseg transform: coopseg.transforms.ElasticDeformation with the same arguments (the same
  TorchIO base class and copy; the fused warp with the C++ backend, `--threads` torch threads).
- coopseg ck.warp: the kernel alone, warp(upsample="bspline", padding_mode="border") with the
  converted grid (convert.bspline_from_sitk, done before the clock starts).
- deepali: FreeFormDeformation + ImageTransformer (linear, border), its own lattice (integer
  stride: S/4 for 7 points per axis, 16 for the /16 grid; control points U(-7.5, 7.5) voxels,
  torch seed 2) and its dense field; compared with ck.warp on that same lattice. Run where
  `import deepali` works, or with the interpreter in COOPSEG_DEEPALI_PYTHON (a side venv with
  `pip install hf-deepali`); otherwise the row says why it was skipped.

Each row runs in a fresh process (`--worker`): peak memory is the growth of the process's
resident set (VmHWM reset by /proc/self/clear_refs, over the first call, the inputs already
built), which sees SimpleITK's and deepali's buffers as well as torch's; coopseg's rows also
give the tensor-storage peak of benchmarks/memory.py. Time: median of `--repeats` calls after
one warm-up. Outputs are compared in the parent (max abs difference).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPE = (256, 256, 128)  # TorchIO's (W, H, D); coopseg's (D, H, W) of the same array
GRIDS = {"7 points/axis": (7, 7, 7), "1/16 grid": tuple(n // 16 + 3 for n in SHAPE)}
DEEPALI_STRIDES = {"7 points/axis": tuple(n // 4 for n in SHAPE), "1/16 grid": (16, 16, 16)}
MAX_DISPLACEMENT = 7.5
IMPLS = ("SimpleITK", "TorchIO", "coopseg transform", "coopseg ck.warp", "deepali")
MiB = 1 << 20


# ----------------------------------------------------------------------------- inputs (deterministic)

def make_image():
    import torch
    torch.manual_seed(0)
    return torch.rand(1, *SHAPE)


def make_control_points(grid: str):
    import torch
    import torchio as tio
    torch.manual_seed(1)
    return tio.RandomElasticDeformation.get_params(GRIDS[grid], (MAX_DISPLACEMENT,) * 3, 2)


def deepali_displacements(grid: str):
    """Control-point displacements in voxels, coopseg's order (1, 3, *s) over (d, h, w), for
    deepali's lattice: control point j at (j - 1) * stride, s = S // stride + 3."""
    import torch
    stride = DEEPALI_STRIDES[grid]
    s = [n // st + 3 for n, st in zip(SHAPE, stride)]
    torch.manual_seed(2)
    return torch.empty(1, 3, *s).uniform_(-MAX_DISPLACEMENT, MAX_DISPLACEMENT), stride


# ----------------------------------------------------------------------------- worker (one row, own process)

def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _rss_peak(fn):
    """(result of fn(), growth of the resident set's high-water mark over the call, bytes)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
    except OSError:
        pass
    before = _status()["VmRSS"]
    out = fn()
    return out, _status()["VmHWM"] - before


def _impl(name: str, grid: str, threads: int):
    """fn() -> numpy output (W, H, D), and the tensor-storage peak for coopseg's rows."""
    import torch
    torch.set_num_threads(threads)
    image = make_image()
    if name == "deepali":
        from deepali import spatial
        from deepali.core import Grid
        vox, stride = deepali_displacements(grid)
        x = image[None]
        size_xyz = tuple(reversed(SHAPE))
        ffd = spatial.FreeFormDeformation(Grid(size=size_xyz, align_corners=True), stride=tuple(reversed(stride)))
        params = torch.stack([vox[:, 2 - c] / ((SHAPE[2 - c] - 1) / 2) for c in range(3)], 1)  # normalised, x first
        with torch.no_grad():
            ffd.data().copy_(params)
        transformer = spatial.ImageTransformer(ffd, sampling="linear", padding="border")

        def run():
            with torch.no_grad():
                return transformer(x)[0].numpy()
        return run, None
    import SimpleITK as sitk
    import torchio as tio
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    cp = make_control_points(grid)
    subject = tio.Subject(img=tio.ScalarImage(tensor=image))
    if name == "SimpleITK":
        from torchio.data.io import nib_to_sitk
        el = tio.ElasticDeformation(control_points=cp, max_displacement=(MAX_DISPLACEMENT,) * 3)
        img = nib_to_sitk(image, np.eye(4), force_3d=True)
        resampler = sitk.ResampleImageFilter()
        resampler.SetReferenceImage(img)
        resampler.SetTransform(el.get_bspline_transform(img))
        resampler.SetInterpolator(sitk.sitkLinear)
        resampler.SetDefaultPixelValue(float(image.min()))
        resampler.SetOutputPixelType(sitk.sitkFloat32)
        return (lambda: sitk.GetArrayFromImage(resampler.Execute(img)).transpose()[None]), None
    if name == "TorchIO":
        el = tio.ElasticDeformation(control_points=cp, max_displacement=(MAX_DISPLACEMENT,) * 3)
        return (lambda: el(subject).img.data.numpy()), None
    from benchmarks.memory import peak_bytes
    if name == "coopseg transform":
        from coopseg.transforms import ElasticDeformation
        el = ElasticDeformation(control_points=cp, max_displacement=(MAX_DISPLACEMENT,) * 3, backend="cpp")

        def run():
            return el(subject).img.data.numpy()
        return run, (lambda: peak_bytes(lambda: el(subject), torch.device("cpu")))
    if name == "coopseg ck.warp":
        import coopseg_kernels as ck
        from coopseg.transforms import _reference_image
        from coopseg_kernels import convert
        el = tio.ElasticDeformation(control_points=cp, max_displacement=(MAX_DISPLACEMENT,) * 3)
        ref = _reference_image(SHAPE, np.eye(4))
        coarse, origin, spacing = convert.bspline_from_sitk(el.get_bspline_transform(ref), ref)
        coarse = coarse.flip(1).permute(0, 1, 4, 3, 2).contiguous()  # (z, y, x) -> TorchIO's (x, y, z) axes
        kw = dict(upsample="bspline", padding_mode="border", control_origin=origin[::-1],
                  control_spacing=spacing[::-1], backend="cpp")
        x = image[None]

        def run():
            return ck.warp(x, coarse, **kw)[0].numpy()
        return run, (lambda: peak_bytes(lambda: ck.warp(x, coarse, **kw), torch.device("cpu")))
    raise ValueError(f"unknown implementation {name!r}")


def worker(name: str, grid: str, repeats: int, threads: int, save: str) -> dict:
    run, tensor_peak = _impl(name, grid, threads)
    out, rss = _rss_peak(run)
    np.save(save, np.asarray(out, dtype=np.float32))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    row = {"impl": name, "grid": grid, "ms": 1e3 * statistics.median(times), "all_ms": [1e3 * t for t in times],
           "peak_rss_mib": rss / MiB}
    if tensor_peak is not None:
        row["peak_tensor_mib"] = tensor_peak() / MiB
    return row


# ----------------------------------------------------------------------------- parent: rows, comparisons, table

def _python_for(name: str) -> tuple[str | None, str | None]:
    """(interpreter, None) for the row, or (None, why it is skipped)."""
    if name != "deepali":
        return sys.executable, None
    try:
        import deepali  # noqa: F401
        return sys.executable, None
    except ImportError:
        pass
    other = os.environ.get("COOPSEG_DEEPALI_PYTHON")
    if other:
        return other, None
    return None, "deepali is not installed (pip install hf-deepali, or COOPSEG_DEEPALI_PYTHON=<a python that has it>)"


def rows(repeats: int = 3, threads: int = 2, log=sys.stderr) -> list[dict]:
    import torch

    import coopseg_kernels as ck
    out_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for grid in GRIDS:
            outputs = {}
            for name in IMPLS:
                python, why = _python_for(name)
                if python is None:
                    out_rows.append({"impl": name, "grid": grid, "skipped": why})
                    continue
                print(f"bspline ffd: {name}, {grid} ...", file=log, flush=True)
                save = os.path.join(tmp, f"{len(out_rows)}.npy")
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
                proc = subprocess.run([python, __file__, "--worker", name, "--grid", grid, "--repeats", str(repeats),
                                       "--threads", str(threads), "--save", save],
                                      capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    out_rows.append({"impl": name, "grid": grid, "skipped": f"failed: {tail}"})
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                outputs[name] = np.load(save)
                out_rows.append(row)
            by = {r["impl"]: r for r in out_rows if r["grid"] == grid and "ms" in r}
            torchio = outputs.get("TorchIO")

            def diff(a, b, where=None):
                d = np.abs(a.astype(np.float64) - b.astype(np.float64))
                return float(d[where].max() if where is not None else d.max())
            if torchio is not None:
                for name in ("SimpleITK", "coopseg transform"):
                    if name in outputs:
                        by[name]["compared_with"] = "TorchIO"
                        by[name]["max_abs_diff"] = diff(outputs[name], torchio)
                if "coopseg ck.warp" in outputs:
                    inside = torchio != torchio.min()  # ITK's default value marks the positions outside
                    by["coopseg ck.warp"]["compared_with"] = "TorchIO, where ITK samples inside the image"
                    by["coopseg ck.warp"]["max_abs_diff"] = diff(outputs["coopseg ck.warp"], torchio, inside)
            if "deepali" in outputs:
                torch.set_num_threads(threads)
                vox, stride = deepali_displacements(grid)
                ours = ck.warp(make_image()[None], vox, upsample="bspline", padding_mode="border",
                               control_origin=tuple(-float(s) for s in stride),
                               control_spacing=tuple(float(s) for s in stride))[0].numpy()
                by["deepali"]["compared_with"] = "coopseg ck.warp on deepali's lattice"
                by["deepali"]["max_abs_diff"] = diff(outputs["deepali"], ours)
            for name, r in by.items():
                if name != "TorchIO" and "TorchIO" in by:
                    r["x_vs_torchio"] = by["TorchIO"]["ms"] / r["ms"]
                if name != "SimpleITK" and "SimpleITK" in by:
                    r["x_vs_simpleitk"] = by["SimpleITK"]["ms"] / r["ms"]
    return out_rows


def markdown(rows_: list[dict]) -> str:
    lines = ["| B-spline FFD 256x256x128 | grid | ms (median) | TorchIO / this | SimpleITK / this | peak RSS MiB "
             "| peak tensors MiB | output |", "|---|---|---|---|---|---|---|---|"]
    for r in rows_:
        if "skipped" in r:
            lines.append(f"| {r['impl']} | {r['grid']} | skipped: {r['skipped']} | | | | | |")
            continue
        ratio = f"{r['x_vs_torchio']:.1f}" if "x_vs_torchio" in r else ""
        ratio_s = f"{r['x_vs_simpleitk']:.1f}" if "x_vs_simpleitk" in r else ""
        tensors = f"{r['peak_tensor_mib']:.1f}" if "peak_tensor_mib" in r else ""
        out = f"max abs diff {r['max_abs_diff']:.2g} vs {r['compared_with']}" if "max_abs_diff" in r else ""
        lines.append(f"| {r['impl']} | {r['grid']} | {r['ms']:.0f} | {ratio} | {ratio_s} | {r['peak_rss_mib']:.0f} "
                     f"| {tensors} | {out} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads and SimpleITK threads of every row")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results.jsonl)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--grid", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.grid, args.repeats, args.threads, args.save)))
        return 0
    import torch

    from benchmarks.harness import append_result, machine
    torch.set_num_threads(args.threads)
    info = machine(torch.device("cpu"))
    table_rows = rows(args.repeats, args.threads)
    table = markdown(table_rows) + f"\n\n{info['cpu']}, {args.threads} threads, torch {info['torch']}, {info['date']}"
    print(table)
    path = append_result(args.out, __file__, argv, info, {"machine": info, "bspline_rows": table_rows,
                                                           "table": table})
    print(f"\nappended to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
