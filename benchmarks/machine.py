"""What every benchmark prints about the machine it ran on, and the process's peak memory."""

from __future__ import annotations

import resource


def cpu_description() -> str:
    """CPU model, core count and the vector / matrix flags that decide speed (AVX2, AVX-512 incl. BF16, AMX)."""
    from hybrid_retrieval.hardware import cpu_description as describe

    return describe()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
