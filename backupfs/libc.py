"""C library functions the os module lacks (mallopt, sync_file_range, syncfs).

One place loads libc for every layer that needs it; a function libc lacks (or a system
without glibc) is None, and the caller does without it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                                            use_errno=True)
except OSError:
    _libc = None


def function(name: str, argtypes: list, restype=ctypes.c_int) -> Callable | None:
    """libc's `name` with its C signature, or None where libc has no such function."""
    fn = getattr(_libc, name, None) if _libc is not None else None
    if fn is None:
        return None
    fn.argtypes = argtypes
    fn.restype = restype
    return fn
