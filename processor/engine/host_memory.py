"""glibc malloc settings for running the model on the CPU.

A CPU step allocates tens of MB of temporaries (each layer's gathered keys and values, attention
scratch). With glibc's defaults, large blocks come from fresh mmap()s and freed heap tops go back to
the OS, so every step page-faults its buffers in again, which can cost as much as the step's compute
(docs/benchmarks.md). Fixed thresholds keep freed memory in the process for the next step; the price is
that the process stays at its peak size. PyTorch's CUDA caching allocator already reuses device
memory; only host allocations are concerned.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD_BYTES = 1 << 30


@functools.cache  # process-wide setting: once is enough
def keep_freed_host_memory() -> bool:
    """Ask glibc to reuse freed memory rather than unmap it; False where the C library isn't glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if not applied:
        log.warning("mallopt refused the malloc thresholds; CPU steps will page-fault their buffers")
    return applied
