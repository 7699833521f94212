"""Peak memory of each phase of one attribution, measured (``AttributionConfig.profile_memory``).

The memory plan (:mod:`~tracer.attribution.memory`) predicts one peak; when a run exceeds it,
this says which phase did: the record pass, gathering the frozen view and the logit targets,
the logit rows, the feature rows, assembling the edges, and scoring the graph. Host peaks are
the process's resident high-water mark (VmHWM), reset at each phase boundary (Linux >= 4.0:
``/proc/self/clear_refs``); device peaks are ``torch.cuda.max_memory_allocated``, reset the
same way. Resetting the high-water mark is process-wide, so profiling is off by default.
"""

from __future__ import annotations

import os

MB = 2**20  # stdlib only at import: scripts/proc_stats.py loads this file in other venvs


def reset_host_peak() -> bool:
    """Reset this process's resident high-water mark; False where the kernel does not allow."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_peak_bytes() -> int | None:
    """This process's resident high-water mark (VmHWM) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def process_rss_bytes() -> int:
    """This process's resident memory now (off Linux: its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PhaseMemory:
    """Per-phase peaks: ``mark(name)`` closes the phase that ran since the previous mark.

    ``phases`` after the run: [{``phase``, ``host_peak_mb`` (the phase's peak),
    ``host_rss_mb`` (resident at its end: what it left behind, freed memory the allocator kept
    included), ``device_peak_mb`` (CUDA only)}], in order. Disabled (``enabled=False``, or
    the kernel refuses the reset) it records nothing and costs nothing."""

    def __init__(self, device, enabled: bool = True):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.phases: list[dict] = []
        self.enabled = bool(enabled) and reset_host_peak()
        if self.enabled and self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def mark(self, phase: str) -> None:
        if not self.enabled:
            return
        import torch

        row: dict = {"phase": phase}
        peak = host_peak_bytes()
        if peak is not None:
            row["host_peak_mb"] = round(peak / MB, 1)
            row["host_rss_mb"] = round(process_rss_bytes() / MB, 1)
        if self.cuda:
            row["device_peak_mb"] = round(torch.cuda.max_memory_allocated(self.device) / MB, 1)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.phases.append(row)
        reset_host_peak()
