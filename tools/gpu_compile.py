"""Compile every Triton kernel specialisation the launchers can request, for
sm_80 and sm_90, on a machine without a GPU; report registers, spills and
shared memory per specialisation.

    python tools/gpu_compile.py                  # full sweep, Markdown table (ptxas -v per kernel)
    python tools/gpu_compile.py --check          # compile only; exit 1 on any error (make gpu-compile)
    python tools/gpu_compile.py --check --subset # a covering subset (tests/test_gpu_compile.py)

How the list is made (so that a new specialisation cannot be missed): the
public ops are called with backend="triton" on tiny CPU tensors over their whole
option space (ND 2/3, every padding mode / boundary, every dtype the Triton
backend accepts, every combination of requested gradients, kernel widths, batch
and channel counts, shapes with sizes of 1 and multiples of 16), with
JITFunction.run replaced by a recorder: whatever the launchers pass to a kernel
is recorded, not launched. Each recorded launch is then specialised exactly as
Triton's JIT would specialise it on the device (its own binder: argument types,
integers equal to 1 turned into constants, 16-divisibility attributes) and
compiled with triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", arch, 32)). The launchers choose INT64 by volume size
alone, so every launch is compiled with INT64 False and True (but warp_gather's,
whose INT64 comes with int64 index tensors: drive_deterministic records those). The sweep fails
if a launcher of coopseg_kernels.triton or a *_kernel of its modules is never
reached.

--subset: the smallest greedy set of specialisations that covers every
(kernel, argument, type / constant / attribute) and (kernel, arch) seen in the
full sweep -- every code path a constexpr or a dtype selects is compiled for
each arch at least once; the full sweep (make gpu-compile) adds their
combinations. Triton's cache (~/.triton/cache) makes reruns of unchanged
kernels fast.

Must run in its own process: TRITON_INTERPRET is forced to 0 before triton is
imported (under the interpreter there is nothing to compile).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"
os.environ.pop("COOPSEG_POISON", None)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

ARCHS = (80, 90)
KERNEL_MODULES = ("coopseg_kernels.triton.warp", "coopseg_kernels.triton.blur",
                  "coopseg_kernels.triton.similarity_step")
KERNEL_MODULES += ("coopseg_kernels.triton.warp_dense",)
KERNEL_MODULES += ("coopseg_kernels.triton.warp_bspline",)
KERNEL_MODULES += ("coopseg_kernels.triton.warp_gather",)
# kernels whose INT64 comes with int64 index tensors (warp_gather's keys, order and run starts):
# the sweep records both (drive_deterministic forces INT64 once), so INT64 is not flipped alone
INT64_WITH_DTYPES = ("coopseg_kernels.triton.warp_gather",)

# ----------------------------------------------------------------------------- recording


class Recorder:
    def __init__(self):
        self.launches: list[tuple[JITFunction, tuple, dict, str]] = []
        self.label = ""
        self.launchers_called: set[str] = set()

    @contextlib.contextmanager
    def active(self):
        import coopseg_kernels.triton as kt
        from coopseg_kernels import _backend

        rec = self
        orig_run, orig_interp = JITFunction.run, _backend._triton_interpreted
        orig_launchers = {name: getattr(kt, name) for name in kt.__all__}

        def run(fn, *args, grid, warmup, **kwargs):
            rec.launches.append((fn, args, dict(kwargs), rec.label))

        def counted(name, f):
            def wrapper(*a, **k):
                rec.launchers_called.add(name)
                return f(*a, **k)
            return wrapper

        JITFunction.run = run
        # the launchers run on CPU tensors; nothing is launched, so no interpreter is needed
        _backend._triton_interpreted = lambda: True
        for name, f in orig_launchers.items():
            setattr(kt, name, counted(name, f))
        try:
            yield self
        finally:
            JITFunction.run = orig_run
            _backend._triton_interpreted = orig_interp
            for name, f in orig_launchers.items():
                setattr(kt, name, f)


def _shapes(nd: int):
    """(image size, coarse size): a cell per few voxels (one tile per cell), cells
    bigger than a tile with sizes divisible by 16, and a single-node grid (sizes 1)."""
    if nd == 3:
        return [((9, 10, 11), (3, 2, 4)), ((32, 16, 16), (2, 2, 2)), ((9, 10, 11), (1, 1, 1))]
    return [((9, 10), (3, 2)), ((32, 48), (2, 3)), ((9, 10), (1, 1))]


BLUR_KERNELS = [(1.0,), (1.0, 2.0, 1.0), (1.0, 4.0, 6.0, 4.0, 1.0), (1.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0)]


def drive(rec: Recorder) -> None:
    """Call every public op of coopseg_kernels with backend="triton" over its option space."""
    import coopseg_kernels as ck
    from coopseg_kernels import _backend, _checks

    dtypes = _backend.kernel_dtypes("triton")
    for nd in (2, 3):
        for size, coarse_size in _shapes(nd):
            for dtype in dtypes:
                for B, C in ((1, 1), (2, 2)):
                    for mode in _checks.WARP_MODES:
                        for pad in _checks.WARP_PADDING_MODES:
                            for grads in ((True, True), (True, False), (False, True)):
                                rec.label = f"warp {nd}-D {mode} {pad} {dtype} grads={grads}"
                                m = torch.rand(B, C, *size, dtype=dtype).requires_grad_(grads[0])
                                c = torch.randn(B, nd, *coarse_size).requires_grad_(grads[1])
                                out = ck.warp(m, c, padding_mode=pad, mode=mode, backend="triton")
                                out.backward(torch.ones_like(out))
                    rec.label = f"similarity_step {nd}-D {dtype}"
                    s = torch.rand(B, C, *size, dtype=dtype)
                    ck.similarity_step(s, s, torch.randn(B, nd, *coarse_size), backend="triton")
                rec.label = f"upsample_field {nd}-D {dtype}"
                c = torch.randn(2, nd, *coarse_size, dtype=dtype, requires_grad=True)
                f = ck.upsample_field(c, size, backend="triton")
                f.backward(torch.ones_like(f))
            for dtype in _checks.LABEL_DTYPES:  # label maps: nearest, forward only
                for pad in _checks.WARP_PADDING_MODES:
                    rec.label = f"warp {nd}-D nearest {pad} {dtype} labels"
                    lab = (torch.rand(1, 1, *size) * 5).to(dtype)
                    ck.warp(lab, torch.randn(1, nd, *coarse_size), padding_mode=pad, mode="nearest", backend="triton")
        for dtype in dtypes:
            for kernel in BLUR_KERNELS:
                for boundary in _checks.BLUR_BOUNDARIES:
                    for size in ((9, 10, 11)[:nd], (32, 16, 16)[:nd]):
                        rec.label = f"blur {nd}-D {dtype} {len(kernel)} taps"
                        x = torch.rand(2, 3, *size, dtype=dtype, requires_grad=True)
                        y = ck.blur(x, kernel=kernel, boundary=boundary, backend="triton")
                        y.backward(torch.ones_like(y))
                        ck.blur_adjoint(x.detach(), kernel=kernel, boundary=boundary, backend="triton")
    drive_dense(rec, dtypes)
    drive_bspline(rec, dtypes)
    drive_deterministic(rec, dtypes)


def drive_dense(rec: Recorder, dtypes) -> None:
    """The full-resolution-field kernels (ops/warp_dense.py): every padding, mode, dtype and
    requested gradients; label maps (nearest); C = 1 and sizes divisible by 16 in fp32."""
    from coopseg_kernels.ops.warp_dense import warp_dense

    labels = (torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)
    for nd in (2, 3):
        for pad in ("zeros", "border", "reflection"):
            for mode in ("bilinear", "nearest"):
                runs = [(dtype, (9, 10, 11)[:nd], 2) for dtype in dtypes]
                runs += [(torch.float32, (32, 16, 16)[:nd], 1)]
                for dtype, size, BC in runs:
                    for grads in ((True, True), (True, False), (False, True)):
                        rec.label = f"warp_dense {nd}-D {pad} {mode} {dtype} C={BC} grads={grads}"
                        m = torch.rand(BC, BC, *size, dtype=dtype).requires_grad_(grads[0])
                        u = torch.randn(BC, nd, *size).requires_grad_(grads[1])
                        out = warp_dense(m, u, padding_mode=pad, mode=mode, backend="triton")
                        out.backward(torch.ones_like(out))
            for dtype in labels:
                rec.label = f"warp_dense {nd}-D {pad} nearest {dtype}"
                x = torch.randint(0, 2, (2, 2, *(9, 10, 11)[:nd])).to(dtype)
                warp_dense(x, torch.randn(2, nd, *(9, 10, 11)[:nd]), padding_mode=pad, mode="nearest",
                           backend="triton")


def drive_bspline(rec: Recorder, dtypes) -> None:
    """The cubic B-spline kernels (ops/warp_bspline.py, upsample="bspline"): every padding, mode,
    dtype and requested gradients, B = C = 1 and 2, knot cells of a few voxels and cells bigger
    than a tile with sizes divisible by 16; upsample_field; label maps (nearest)."""
    import coopseg_kernels as ck

    for nd in (2, 3):
        shapes = [((9, 10, 11)[:nd], (5, 4, 6)[:nd]), ((32, 48, 32)[:nd], (4, 4, 4)[:nd])]
        for pad in ("zeros", "border", "reflection"):
            for mode in ("bilinear", "nearest"):
                for dtype in dtypes:
                    for size, coarse_size in shapes:
                        for BC in (1, 2):
                            for grads in ((True, True), (True, False), (False, True)):
                                rec.label = f"warp bspline {nd}-D {pad} {mode} {dtype} C={BC} grads={grads}"
                                m = torch.rand(BC, BC, *size, dtype=dtype).requires_grad_(grads[0])
                                c = torch.randn(BC, nd, *coarse_size).requires_grad_(grads[1])
                                out = ck.warp(m, c, padding_mode=pad, mode=mode, upsample="bspline", backend="triton")
                                out.backward(torch.ones_like(out))
            for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool):
                rec.label = f"warp bspline {nd}-D {pad} nearest {dtype}"
                x = torch.randint(0, 2, (2, 2, *(9, 10, 11)[:nd])).to(dtype)
                ck.warp(x, torch.randn(2, nd, *(5, 4, 6)[:nd]), padding_mode=pad, mode="nearest", upsample="bspline",
                        backend="triton")
        for dtype in dtypes:
            for size, coarse_size in shapes:
                rec.label = f"upsample_field bspline {nd}-D {dtype}"
                c = torch.randn(2, nd, *coarse_size, dtype=dtype, requires_grad=True)
                f = ck.upsample_field(c, size, upsample="bspline", backend="triton")
                f.backward(torch.ones_like(f))


def drive_deterministic(rec: Recorder, dtypes) -> None:
    """The deterministic image gradient (triton/warp_gather.py) of both warps: every mode,
    padding and dtype, image gradient alone and with the field's; B = C = 1 and > 1; the
    coarse shapes of _shapes and the dense sizes of drive_dense."""
    import coopseg_kernels as ck
    from coopseg_kernels.ops.warp_dense import warp_dense

    for nd in (2, 3):
        for mode in ("bilinear", "nearest"):
            for pad in ("zeros", "border", "reflection"):
                for dtype in dtypes:
                    for grads in ((True, True), (True, False)):
                        for B, C in ((1, 1), (2, 2)):
                            for size, coarse_size in _shapes(nd):
                                rec.label = f"warp {nd}-D {mode} {pad} {dtype} grads={grads} deterministic"
                                m = torch.rand(B, C, *size, dtype=dtype).requires_grad_(grads[0])
                                c = torch.randn(B, nd, *coarse_size).requires_grad_(grads[1])
                                out = ck.warp(m, c, padding_mode=pad, mode=mode, backend="triton", deterministic=True)
                                out.backward(torch.ones_like(out))
                            for size in ((9, 10, 11)[:nd], (32, 16, 16)[:nd]):
                                rec.label = f"warp_dense {nd}-D {mode} {pad} {dtype} grads={grads} deterministic"
                                m = torch.rand(B, C, *size, dtype=dtype).requires_grad_(grads[0])
                                u = torch.randn(B, nd, *size).requires_grad_(grads[1])
                                out = warp_dense(m, u, padding_mode=pad, mode=mode, backend="triton",
                                                 deterministic=True)
                                out.backward(torch.ones_like(out))
    # int64 keys, order and run starts (B * K >= 2^31 - 1): forced on small inputs, one launch per flag set
    os.environ["COOPSEG_FORCE_INT64"] = "1"
    try:
        for nd in (2, 3):
            for mode in ("bilinear", "nearest"):
                for pad in ("zeros", "border", "reflection"):
                    for dtype in dtypes:
                        rec.label = f"warp {nd}-D {mode} {pad} {dtype} deterministic int64 keys"
                        size, coarse_size = _shapes(nd)[0]
                        for cs in (coarse_size, size):  # the coarse and the dense path
                            m = torch.rand(2, 2, *size, dtype=dtype, requires_grad=True)
                            out = ck.warp(m, torch.randn(2, nd, *cs), padding_mode=pad, mode=mode, backend="triton",
                                          deterministic=True)
                            out.backward(torch.ones_like(out))
    finally:
        os.environ.pop("COOPSEG_FORCE_INT64", None)


def kernels_in_modules() -> set[str]:
    names = set()
    for mod in KERNEL_MODULES:
        m = importlib.import_module(mod)
        for name, obj in vars(m).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                names.add(f"{mod}.{name}")
    return names


# ----------------------------------------------------------------------------- specialisation


def _freeze(v):
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


def specialise(fn: JITFunction, args: tuple, kwargs: dict, arch: int, binders: dict) -> dict:
    """What Triton's JIT would compile for this launch on a device of `arch`
    (JITFunction.run / _pack_args, with the backend of that target)."""
    key = (id(fn), arch)
    if key not in binders:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        binders[key] = (backend, create_function_from_signature(fn.signature, fn.params, backend))
    backend, binder = binders[key]
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return {
        "module": fn.__module__, "kernel": fn.__name__, "arch": arch,
        "signature": signature, "constexprs": {k: v for k, v in constexprs.items()},
        "attrs": attrs, "options": {"num_warps": options.num_warps, "num_stages": options.num_stages},
    }


def spec_key(s: dict):
    return (s["module"], s["kernel"], s["arch"], _freeze(s["signature"]), _freeze(s["constexprs"]),
            _freeze(s["attrs"]), _freeze(s["options"]))


def describe(s: dict) -> dict:
    """Readable form: pointer dtypes, constexpr values by name, ints specialised to 1."""
    params = s["params"]
    named_consts = {params[p[0]]: v for p, v in s["constexprs"].items()}
    return {
        "kernel": s["kernel"], "arch": f"sm_{s['arch']}",
        "dtypes": sorted({t[1:] for t in s["signature"].values() if t.startswith("*")}),
        "flags": {k: v for k, v in named_consts.items() if k in s["constexpr_params"]},
        "ones": sorted(k for k, v in named_consts.items() if k not in s["constexpr_params"]),
        "div16": sorted(params[p[0]] for p, a in s["attrs"].items()
                        if a and not s["signature"][params[p[0]]].startswith("*")),
    }


def collect() -> tuple[list[dict], list[str]]:
    """All distinct specialisations (for ARCHS) and the coverage errors."""
    rec = Recorder()
    with rec.active():
        drive(rec)
    binders: dict = {}
    specs: dict = {}
    for fn, args, kwargs, label in rec.launches:
        variants = [kwargs]
        if "INT64" in kwargs and fn.__module__ not in INT64_WITH_DTYPES:
            # the launchers pick INT64 from the volume size alone: both are reachable
            variants = [dict(kwargs, INT64=False), dict(kwargs, INT64=True)]
        for kw in variants:
            for arch in ARCHS:
                s = specialise(fn, args, kw, arch, binders)
                k = spec_key(s)
                if k not in specs:
                    s["label"] = label
                    s["params"] = list(fn.arg_names)
                    s["constexpr_params"] = [p.name for p in fn.params if p.is_constexpr]
                    specs[k] = s
    errors = []
    import coopseg_kernels.triton as kt
    missing = sorted(set(kt.__all__) - rec.launchers_called)
    if missing:
        errors.append(f"launchers never called by the sweep: {missing}")
    seen = {f"{s['module']}.{s['kernel']}" for s in specs.values()}
    unlaunched = sorted(kernels_in_modules() - seen)
    if unlaunched:
        errors.append(f"kernels never launched by the sweep: {unlaunched}")
    return list(specs.values()), errors


def features(s: dict) -> set:
    k = (s["kernel"], s["arch"])
    f = {k}
    for name, t in s["signature"].items():
        f.add((*k, name, t))
    for p, v in s["constexprs"].items():
        f.add((*k, p, "=", v))
    for p, a in s["attrs"].items():
        f.add((*k, p, "attr", _freeze(a)))
    return f


def flag_key(s: dict):
    """A specialisation up to its runtime ints: kernel, arch, constexpr flags and argument dtypes."""
    d = describe(s)
    ptr_types = tuple(t for t in s["signature"].values() if t.startswith("*"))
    return (s["module"], d["kernel"], s["arch"], _freeze(d["flags"]), ptr_types)


def sweep(specs: list[dict]) -> list[dict]:
    """Every combination of constexpr flags, argument dtypes and arch (the most
    generic launch of each: fewest ints specialised to 1), plus the covering
    subset for the integer specialisations."""
    best: dict = {}
    for s in specs:
        k = flag_key(s)
        if k not in best or len(describe(s)["ones"]) < len(describe(best[k])["ones"]):
            best[k] = s
    chosen = {spec_key(s): s for s in best.values()}
    for s in covering_subset(specs):
        chosen.setdefault(spec_key(s), s)
    return list(chosen.values())


def covering_subset(specs: list[dict]) -> list[dict]:
    """Greedy set cover of features(): every argument type, constant value,
    attribute and arch of every kernel at least once."""
    todo = set().union(*(features(s) for s in specs))
    chosen = []
    remaining = list(specs)
    while todo:
        best = max(remaining, key=lambda s: len(features(s) & todo))
        chosen.append(best)
        remaining.remove(best)
        todo -= features(best)
    return chosen


# ----------------------------------------------------------------------------- compiling


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _nvidia_tool(name: str) -> str:
    from triton import knobs
    return getattr(knobs.nvidia, name).path


def compile_spec(s: dict, ptxas: bool = False) -> dict:
    """Compile one specialisation; registers etc. from the cubin (cuobjdump), and
    with ptxas=True the spill counts of `ptxas -v` on its PTX."""
    t0 = time.perf_counter()
    fn = getattr(importlib.import_module(s["module"]), s["kernel"])
    out = {"ok": False}
    try:
        src = ASTSource(fn, s["signature"], s["constexprs"], s["attrs"])
        k = triton.compile(src, target=GPUTarget("cuda", s["arch"], 32), options=dict(s["options"]))
    except Exception as exc:  # noqa: BLE001 -- any compile failure is the result
        out["error"] = f"{type(exc).__name__}: {exc}"[:4000]
        out["seconds"] = time.perf_counter() - t0
        return out
    out.update(ok=True, shared=k.metadata.shared, num_warps=k.metadata.num_warps)
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True).stdout
        m = _RES.search(usage)
        if m:
            out.update(regs=int(m[1]), stack=int(m[2]), cubin_shared=int(m[3]), local=int(m[4]))
        if ptxas:
            from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
            ptx = Path(d) / "k.ptx"
            ptx.write_text(k.asm["ptx"])
            # the ptxas triton itself uses for this arch, with its register-allocation flag
            log = subprocess.run([get_ptxas(s["arch"]).path, "-v", "--regAllocOptLevel=2",
                                  f"--gpu-name={sm_arch_from_capability(s['arch'])}", str(ptx), "-o",
                                  str(Path(d) / "k.o")], capture_output=True, text=True).stderr
            sp = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
            rg = re.search(r"Used (\d+) registers", log)
            if sp:
                out.update(spill_stores=int(sp[1]), spill_loads=int(sp[2]))
            if rg:
                out["ptxas_regs"] = int(rg[1])
    out["seconds"] = time.perf_counter() - t0
    return out


def _worker_init():
    os.environ["TRITON_INTERPRET"] = "0"


def compile_all(specs: list[dict], jobs: int, ptxas: bool = False, progress: bool = True) -> list[dict]:
    args = [{k: v for k, v in s.items() if k not in ("label", "params", "constexpr_params")} for s in specs]
    if jobs <= 1:
        return [compile_spec(a, ptxas) for a in args]
    results = [None] * len(args)
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        futs = {pool.submit(compile_spec, a, ptxas): i for i, a in enumerate(args)}
        it = futs
        try:
            from concurrent.futures import as_completed

            from tqdm import tqdm
            it = tqdm(as_completed(futs), total=len(futs), desc="compiling", file=sys.stderr,
                      disable=not progress)
        except ImportError:
            pass
        for f in it:
            results[futs[f]] = f.result()
    return results


# ----------------------------------------------------------------------------- report


def _flags_text(d: dict) -> str:
    parts = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in d["flags"].items() if k != "BLOCK"]
    return " ".join(parts)


def markdown(specs: list[dict], results: list[dict], archs) -> str:
    """One row per kernel, argument dtypes and constexpr flags; per arch: registers,
    spill stores/loads (ptxas -v) and shared memory (bytes)."""
    rows: dict = {}
    for s, r in zip(specs, results):
        d = describe(s)
        key = (d["kernel"], _flags_text(d), ",".join(t for t in d["dtypes"] if t != "i32"))
        rows.setdefault(key, {})[s["arch"]] = r
    head = "| kernel | constexprs | tensor dtypes | " + " | ".join(
        f"sm_{a} regs | sm_{a} spill st/ld B | sm_{a} smem B" for a in archs) + " |"
    lines = [head, "|" + "---|" * (3 + 3 * len(archs))]
    for key in sorted(rows):
        cells = []
        for a in archs:
            r = rows[key].get(a)
            if r is None:
                cells += ["", "", ""]
            elif not r["ok"]:
                cells += ["COMPILE ERROR", "", ""]
            else:
                cells += [str(r.get("ptxas_regs", r.get("regs"))),
                          f"{r.get('spill_stores', '?')}/{r.get('spill_loads', '?')}", str(r["shared"])]
        lines.append("| " + " | ".join([*key, *cells]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compile only (no ptxas -v), exit 1 on any failure")
    scope = ap.add_mutually_exclusive_group()
    scope.add_argument("--subset", action="store_true", help="only the covering subset (fast; make test)")
    scope.add_argument("--every", action="store_true",
                       help="every distinct specialisation seen (incl. every combination of sizes of 1; slow)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile processes (default 2)")
    ap.add_argument("--arch", type=int, nargs="*", default=list(ARCHS))
    ap.add_argument("--kernel", nargs="*", default=None, help="only these kernels")
    ap.add_argument("--dtypes", nargs="*", default=None,
                    help="table: only launches whose tensors are all of these dtypes (e.g. fp32; i32 tables always)")
    ap.add_argument("--int64", action="store_true", help="table: also the INT64 specialisations")
    ap.add_argument("--json", default=None, help="write the specialisations and results here")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    specs, errors = collect()
    specs = [s for s in specs if s["arch"] in args.arch and (args.kernel is None or s["kernel"] in args.kernel)]
    total = len(specs)
    specs = covering_subset(specs) if args.subset else specs if args.every else sweep(specs)
    if not args.check:
        # the table: the most generic launch of each flag combination
        specs = [s for s in sweep(specs) if (args.int64 or not describe(s)["flags"].get("INT64"))
                 and (args.dtypes is None or set(describe(s)["dtypes"]) - {"i32"} <= set(args.dtypes))]
        specs = list({flag_key(s): s for s in specs}.values())
    print(f"{len(specs)} of {total} distinct specialisations to compile ({time.perf_counter() - t0:.1f} s to collect)",
          file=sys.stderr, flush=True)
    results = compile_all(specs, args.jobs, ptxas=not args.check)
    failed = [(s, r) for s, r in zip(specs, results) if not r["ok"]]
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{**describe(s), "label": s["label"], **r} for s, r in zip(specs, results)], indent=1, default=str))
    if args.check:
        for s, r in failed:
            d = describe(s)
            print(f"FAILED {d['kernel']} {d['arch']} {d['dtypes']} {_flags_text(d)} ints=1: {d['ones']} "
                  f"({s['label']}):\n{r['error']}\n")
        print(f"compiled {len(specs) - len(failed)}/{len(specs)} specialisations for "
              f"{', '.join(f'sm_{a}' for a in args.arch)} in {time.perf_counter() - t0:.0f} s "
              f"(triton {triton.__version__})")
    else:
        print(markdown(specs, results, args.arch))
        print(f"\ntriton {triton.__version__} without a GPU: registers and spills from `ptxas -v` of the "
              f"triton wheel on each kernel's PTX, shared memory from the compiled kernel's metadata; "
              f"{results[0].get('num_warps', 4) if results else 4} warps (the launchers' default)")
    for e in errors:
        print(f"COVERAGE ERROR: {e}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
