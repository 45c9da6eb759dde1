"""Keep freed memory in the process instead of handing it back to the kernel at once.

Every READ and every sealed block allocates buffers of 128 KiB to 1 MiB and frees them
a moment later. With glibc's defaults such sizes are mapped and unmapped again, or
trimmed off the heap once freed, so they come back as new pages: 200 cycles of a READ's
buffers (eight 128 KiB blocks and their 1 MiB join) took 96,062 page faults, and 96 with
the settings below (tests/test_heap.py). On a VM whose balloon reports free pages to the
host, a fresh page is dear: reading 1 GiB through the block store in one thread spent
0.60 s in `b"".join` and 0.37 s copying raw blocks, against 0.12 s and 0.11 s with these
settings. Through the mount the daemon's CPU for a cold 1 GiB read went from 3.3-3.5 s
to 3.1-3.3 s (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import logging

from . import libc

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Allocations below this come from the heap (the largest routine one is a 1 MiB READ
# reply; blocks may be up to 4 MiB).
MMAP_THRESHOLD = 8 * 1024 * 1024
# Free memory at the top of a heap beyond this is given back to the kernel.
TRIM_THRESHOLD = 64 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Tune glibc's allocator for this process; False where there is no glibc."""
    mallopt = libc.function("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    ok = (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
          and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    if not ok:
        log.debug("mallopt refused; allocator left as it was")
    return ok
