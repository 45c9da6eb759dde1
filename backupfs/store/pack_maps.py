"""Pack files mapped into memory, so that the event loop reads cached records in place.

A record the page cache holds costs most of its read in the copy out of the cache: a
cold 1 GiB read through `pread` spent 0.6-0.7 s of system time per GiB on it here, and
the same records read through a mapping 0.07-0.1 s (docs/performance.md, "Pack records
read in place"). Decompressing and hashing from the mapping reads each byte once.

A mapping is only ever read where `mincore` says the page cache holds every page of the
record. That keeps the event loop from waiting for the disk in a page fault, and it keeps
the disk's errors out of the mapping: a page that the disk failed to read would end the
daemon with SIGBUS, where `pread` returns EIO. Records that are not cached are read with
`pread` in worker threads as before (`PackSet.read`).

Pages read through a mapping stay mapped, and count in the daemon's resident memory,
until they are unmapped: every RELEASE_EVERY bytes read, the pages of every mapping read
through meanwhile are (`MADV_DONTNEED`, which leaves them in the page cache), so a restore
of a terabyte does not show as a daemon of that size.

The mappings are private and never written (`mmap.ACCESS_COPY` only because `ctypes`
gives the address of a writable buffer alone), grow by mapping the file again when a
record lies past the end of the last mapping, and are forgotten, least recently used
first, past MAX_MAPPED (the kernel allows a process 65,530 mappings in all).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from .. import libc

MAX_MAPPED = 256
RELEASE_EVERY = 16 * 1024 * 1024
# Records spread over at most this much of a pack are checked with one mincore.
HULL_MAX = 4 * 1024 * 1024
PAGE = mmap.PAGESIZE

_mincore = libc.function("mincore", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p])


class _Mapping:
    __slots__ = ("map", "view", "address", "size")

    def __init__(self, fd: int, size: int):
        m = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        pin = ctypes.c_char.from_buffer(m)  # an export while the address is taken
        self.address = ctypes.addressof(pin)
        del pin
        # The mapping lives as long as this view or any slice of it: a slice handed to
        # a reader keeps its pages mapped after the pack is forgotten.
        self.map = m
        self.view = memoryview(m)
        self.size = size


class PackMaps:
    """Memory views of pack records that are in the page cache. Thread-safe."""

    def __init__(self, path_of: Callable[[int], Path]):
        self._path_of = path_of
        self._maps: OrderedDict[int, _Mapping] = OrderedDict()
        self._lock = threading.Lock()
        self._pages = ctypes.create_string_buffer(64)
        # Mappings read through since their pages were last unmapped, and how much.
        self._touched: set[_Mapping] = set()
        self._unreleased = 0

    @staticmethod
    def available() -> bool:
        return _mincore is not None

    def views_if_cached(self, pack_id: int,
                        ranges: list[tuple[int, int]]) -> list[memoryview | None]:
        """For each (offset, length) of the pack, its bytes in place if every page of
        it is cached, else None (also where the pack is gone or shorter than that).
        Records near each other (one READ's) are checked with one `mincore`."""
        lo = min(off for off, _ in ranges)
        hi = max(off + n for off, n in ranges)
        with self._lock:
            m = self._mapping(pack_id, hi)
            if m is None:
                return [None] * len(ranges)
            self._count_read(m, sum(n for _, n in ranges))
            if hi - lo <= HULL_MAX:
                first, cached = self._cached_pages(m, lo, hi - lo)
                return [self._view_if_all_in(m, first, cached, off, n) for off, n in ranges]
            return [self._view_if_all_in(m, *self._cached_pages(m, off, n), off, n)
                    for off, n in ranges]

    def forget(self, pack_id: int) -> None:
        """Drop a pack's mapping (it was removed); readers holding a slice keep theirs."""
        with self._lock:
            self._touched.discard(self._maps.pop(pack_id, None))

    def forget_all(self) -> None:
        with self._lock:
            self._maps.clear()
            self._touched.clear()

    def _count_read(self, m: _Mapping, nbytes: int) -> None:
        """Unmap the pages of every mapping read through once RELEASE_EVERY bytes were
        read since the last time. Called before the residency check, so that no view
        checked since is unmapped."""
        if self._unreleased >= RELEASE_EVERY:
            for touched in self._touched:
                touched.map.madvise(mmap.MADV_DONTNEED)
            self._touched.clear()
            self._unreleased = 0
        self._touched.add(m)
        self._unreleased += nbytes

    def _mapping(self, pack_id: int, end: int) -> _Mapping | None:
        m = self._maps.get(pack_id)
        if m is not None and end <= m.size:
            self._maps.move_to_end(pack_id)
            return m
        try:
            fd = os.open(self._path_of(pack_id), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if end > size:
                return None
            self._touched.discard(self._maps.get(pack_id))
            m = self._maps[pack_id] = _Mapping(fd, size)
        finally:
            os.close(fd)
        self._maps.move_to_end(pack_id)
        while len(self._maps) > MAX_MAPPED:
            self._touched.discard(self._maps.popitem(last=False)[1])
        return m

    def _cached_pages(self, m: _Mapping, offset: int, length: int) -> tuple[int, bytes | None]:
        """The first page's offset, and one byte per page from there that is non-zero
        where the page cache holds the page (None if mincore failed)."""
        first = offset - offset % PAGE
        pages = (offset + length - first + PAGE - 1) // PAGE
        if pages > len(self._pages):
            self._pages = ctypes.create_string_buffer(pages)
        if _mincore(m.address + first, pages * PAGE, self._pages) != 0:
            return first, None
        return first, self._pages.raw[:pages]

    @staticmethod
    def _view_if_all_in(m: _Mapping, first: int, cached: bytes | None, offset: int,
                        length: int) -> memoryview | None:
        """The record's view if every one of its pages is cached; `cached` has a byte
        per page from offset `first`."""
        if cached is None:
            return None
        lo = (offset - first) // PAGE
        hi = (offset + length - first + PAGE - 1) // PAGE
        if b"\0" in cached[lo:hi]:
            return None
        return m.view[offset:offset + length]
