"""A process's memory as Linux reports it in /proc: the bench, the soak and the tests read it here."""
from __future__ import annotations

import math


def status_mb(field: str, pid: int | str = "self") -> float:
    """A memory field of /proc/<pid>/status in MB (VmRSS: resident now, VmHWM: its peak since
    start or the last `reset_peak_rss`); nan when the kernel does not report that field."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # the kernel writes kB
    return math.nan


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of process `pid` now, in MB."""
    return status_mb("VmRSS", pid)


def reset_peak_rss() -> float:
    """Reset this process's RSS high-water mark (Linux >= 4.0); return the RSS now (MB), nan
    without /proc (not Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return math.nan
    return rss_mb()
