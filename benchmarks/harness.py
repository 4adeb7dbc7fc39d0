"""Timing, memory and machine facts shared by the table script and the
pytest-benchmark files; the results file they append to."""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .memory import peak_bytes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.jsonl"  # append-only, one JSON object per run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: torch.device, *, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "device": device.type,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    info["host"] = os.environ.get("COOPSEG_BENCH_HOST", platform.node())
    return info


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write)."""
    n = nbytes // 4
    a = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    t = median_seconds(lambda: b.copy_(a), device, repeats=10, warmup=2)
    return 2 * a.numel() * 4 / t


def git_commit() -> str | None:
    """The checked-out commit (short hash), or None outside a git clone."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def append_result(out: str | os.PathLike | None, script: str, argv: list[str] | None, info: dict,
                  figures: dict) -> Path:
    """Append one JSON line to the results file: `out` (a .jsonl file, or a folder that gets
    results.jsonl), by default benchmarks/results.jsonl. The line holds the UTC date and time,
    the benchmark (the script's name) and its command, the device, the CPU model, the commit
    and `figures` (what the script measured)."""
    path = Path(out) if out else RESULTS
    if path.is_dir() or not path.suffix:
        path = path / "results.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    script = Path(script).resolve()
    rel = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "benchmark": script.stem,
        "command": shlex.join(["python", str(rel), *(sys.argv[1:] if argv is None else argv)]),
        "device": info.get("gpu", info["device"]),
        "cpu": info["cpu"],
        "commit": git_commit(),
        "figures": figures,
    }
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return path


def module_from_commit(path: str, commit: str, name: str, renamed: dict | None = None):
    """Import the file `path` as it was at `commit` (`git show commit:path` into a temporary
    module named `name`). `renamed` maps module names the old code imports to where they live
    now (aliased in sys.modules while it imports). Returns (module, None), or (None, why) when
    git, the commit or the file is unavailable (a shallow clone, a copy without .git) or the old
    code no longer imports."""
    try:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{path}"],
                             capture_output=True, text=True, check=True).stdout
    except OSError as e:
        return None, f"git is not available ({e})"
    except subprocess.CalledProcessError as e:
        return None, f"git show {commit}:{path} failed: {e.stderr.strip() or e}"
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / f"{name}.py"
        file.write_text(src)
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        aliases = [old for old in (renamed or {}) if old not in sys.modules]
        try:
            for old in aliases:
                sys.modules[old] = importlib.import_module(renamed[old])
            spec.loader.exec_module(module)
        except Exception as e:  # the old code against today's package
            del sys.modules[name]
            return None, f"{path} at {commit} does not import: {type(e).__name__}: {e}"
        finally:
            for old in aliases:
                sys.modules.pop(old, None)
    return module, None


__all__ = ["median_seconds", "machine", "peak_bytes", "copy_bandwidth", "sync", "append_result", "git_commit",
           "module_from_commit", "RESULTS"]
