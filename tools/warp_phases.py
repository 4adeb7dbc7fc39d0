"""Build and run tools/warp_phases.cpp: the CPU warp's per-phase time at
256x256x128 /16 fp32 C=1 on one thread (see the .cpp). Compiled with the
extension's flags from setup.py; --march picks the instruction set (native, the
default as in setup.py; x86-64-v3 for AVX2 only; x86-64 as COOPSEG_NATIVE=0).

    python tools/warp_phases.py [--march x86-64-v3] [--runs 10]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from torch.utils.cpp_extension import include_paths, library_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-std=c++20"]  # as setup.py


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--march", default="native",
                   help="-march value, or 'none' for the compiler default (COOPSEG_NATIVE=0)")
    p.add_argument("--runs", type=int, default=10)
    a = p.parse_args(argv)
    exe = os.path.join(ROOT, "build", f"warp_phases-{a.march}")
    os.makedirs(os.path.dirname(exe), exist_ok=True)
    cmd = ["g++", *FLAGS, *([] if a.march == "none" else [f"-march={a.march}"])]
    cmd += ["-I", os.path.join(ROOT, "csrc", "cpu")]
    cmd += [f"-I{d}" for d in include_paths()] + [os.path.join(ROOT, "tools", "warp_phases.cpp"), "-o", exe]
    cmd += [f"-L{d}" for d in library_paths()] + ["-lc10", "-ltorch_cpu"] + [f"-Wl,-rpath,{d}" for d in library_paths()]
    subprocess.run(cmd, check=True)
    print(f"-march={a.march}", flush=True)
    return subprocess.run([exe, str(a.runs)]).returncode


if __name__ == "__main__":
    sys.exit(main())
