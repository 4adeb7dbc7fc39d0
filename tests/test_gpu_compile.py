"""GPU readiness without a GPU: the Triton kernels compile for sm_80 and sm_90.

tools/gpu_compile.py records every launch the Triton launchers make
over the public ops' option space and compiles each specialisation with
triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)). It needs a
process without TRITON_INTERPRET (conftest sets it for the other tests), hence
the subprocesses. Here: the covering subset (every argument type, constexpr
value and integer specialisation of every kernel, for each arch; ~1 min on 2
cores). `make gpu-compile` compiles every flag x dtype x arch combination.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_compile.py"

triton = pytest.importorskip("triton")
try:
    from triton.backends.nvidia import compiler as _nvidia  # noqa: F401
except ImportError:  # pragma: no cover - a triton wheel without the CUDA backend
    pytest.skip("triton has no NVIDIA backend here", allow_module_level=True)
# the sweep specialises launches with Triton's own JIT binder (internal API of triton 3.9)
from triton.runtime import jit as _jit  # noqa: E402

if not (hasattr(_jit, "create_function_from_signature") and hasattr(_jit.JITFunction, "_pack_args")):
    pytest.skip(f"the compile sweep needs triton 3.9's JIT internals, this is triton {triton.__version__}",
                allow_module_level=True)


def _env():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("COOPSEG_POISON", None)
    return env


def test_every_kernel_compiles_for_sm80_and_sm90():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check", "--subset", "--jobs", "2"],
                          capture_output=True, text=True, env=_env(), timeout=900, cwd=ROOT)
    report = proc.stdout + proc.stderr[-4000:]
    assert proc.returncode == 0, report
    assert "COVERAGE ERROR" not in proc.stdout, report
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("compiled ")][-1]
    done, total = line.split()[1].split("/")
    assert done == total and int(total) >= 12, line  # 3 kernels x 2 archs, several variants each


def test_a_compile_error_is_reported(tmp_path):
    # the check must be able to fail: a kernel with a type error does not compile
    (tmp_path / "broken_kernel.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def broken_kernel(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) + tl.arange(0, BLOCK + 1))
    """))
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(tmp_path)!r}, {str(SCRIPT.parent)!r}]
        import gpu_compile as g
        spec = dict(module="broken_kernel", kernel="broken_kernel", arch=90,
                    signature={{"x_ptr": "*fp32", "BLOCK": "constexpr"}}, constexprs={{(1,): 64}},
                    attrs={{}}, options={{"num_warps": 4, "num_stages": 3}})
        r = g.compile_spec(spec)
        assert not r["ok"] and "error" in r, r
        print("REPORTED", r["error"].splitlines()[0])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0 and "REPORTED" in proc.stdout, proc.stdout + proc.stderr
