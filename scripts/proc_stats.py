"""Process measurements shared by the benchmark scripts (stdlib only: it also runs inside the
separate circuit-tracer virtual environment). Linux: /proc and ru_maxrss in KiB."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _load_phases():
    """tracer/attribution/memory_phases.py, loaded by path: the one implementation of the high-water
    mark helpers (stdlib only at import), usable where circuit-atlas is not installed."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tracer" / "attribution" / "memory_phases.py"
    spec = importlib.util.spec_from_file_location("_atlas_phases", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_phases = _load_phases()
# Reset this process's resident high-water mark (True if the kernel allows it).
reset_peak_rss = _phases.reset_host_peak


def hwm_mb() -> float:
    """Resident-memory high-water mark (VmHWM) in MB (nan off Linux)."""
    peak = _phases.host_peak_bytes()
    return float("nan") if peak is None else peak / 2**20


def rss_mb() -> float:
    return _phases.process_rss_bytes() / 2**20


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
