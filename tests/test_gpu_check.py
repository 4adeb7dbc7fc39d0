"""Dry run on CPU of what `make gpu-check` runs on a lent GPU machine, whose python3
has no nibabel and no network: the CUDA test files collect and the benchmark
scripts import without nibabel, and the bandwidth code path runs (device cpu)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import coopseg_kernels as ck

ROOT = Path(__file__).resolve().parent.parent


def _cuda_test_files():
    # tools/gpu_check.sh's cuda_tests: files holding cuda-marked tests
    marker = "pytest.mark." + "cuda"  # spelled so that this file does not match itself
    return [str(p) for p in sorted((ROOT / "tests").glob("test_*.py")) if marker in p.read_text()]


def test_gpu_check_path_needs_no_nibabel_nor_network():
    files = _cuda_test_files()
    assert {"test_warp.py", "test_blur.py"} <= {Path(f).name for f in files}
    code = textwrap.dedent(f"""
        import sys, socket, importlib.abc

        class NoNibabel(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "nibabel" or name.startswith("nibabel."):
                    raise ImportError("nibabel is not installed on the GPU machine")
                return None

        sys.meta_path.insert(0, NoNibabel())
        sys.modules.pop("nibabel", None)

        def no_network(*a, **k):
            raise OSError("no network on the GPU machine")
        socket.socket.connect = no_network
        socket.create_connection = no_network

        import pytest
        rc = pytest.main(["--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider", *{files!r}])
        assert rc == 0, rc
        import benchmarks.table, benchmarks.bandwidth, benchmarks.cases, benchmarks.deterministic  # noqa: F401
        print("GPU-CHECK-PATH-OK")
    """)
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and "GPU-CHECK-PATH-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cuda" in proc.stdout  # the cuda-marked tests were collected


@pytest.mark.skipif(not ck.HAS_CPP, reason="C++ extension not built (the CPU dry run uses it)")
def test_bandwidth_report_runs_on_cpu(tmp_path, capsys):
    from benchmarks import bandwidth

    assert bandwidth.main(["--device", "cpu", "--size", "20", "18", "17", "--repeats", "1",
                           "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Copy bandwidth (read + write)" in out and "| warp_fwd |" in out and "| blur_apply [1,2,1] |" in out
    lines = (tmp_path / "results.jsonl").read_text().splitlines()  # the run, appended as one JSON line
    assert len(lines) == 1
    assert json.loads(lines[0])["benchmark"] == "bandwidth" and json.loads(lines[0])["device"] == "cpu"


def test_deterministic_benchmark_runs_on_cpu(tmp_path, capsys):
    # the interpreted Triton kernels on a tiny volume: the code path of gpu-check's step, not its times
    pytest.importorskip("triton")
    from benchmarks import deterministic

    assert deterministic.main(["--device", "cpu", "--size", "5", "4", "--repeats", "1",
                               "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| warp_dense_bwd, bilinear, image + field grads |" in out and "| yes |" in out
    assert json.loads((tmp_path / "results.jsonl").read_text())["benchmark"] == "deterministic"
