"""What every benchmark prints about the machine it ran on, and the process's peak memory."""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path


def cpu_description() -> str:
    """CPU model, core count and the vector / matrix flags that decide speed (AVX2, AVX-512 incl. BF16, AMX)."""
    from hybrid_retrieval.hardware import cpu_flags

    model, flags = platform.processor() or "unknown CPU", cpu_flags()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    shown = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    return f"{model}, {os.cpu_count()} cores; flags: {' '.join(shown) or 'none of avx2/avx512/amx'}"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
