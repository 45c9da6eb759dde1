"""Appending to the pack open for writing, past the kernel's page cache.

Pack bytes are written once and read back rarely (a cold restore, a verify), while the
files they hold are cached by the kernel anyway, as the FUSE files' pages. Sending them
through the page cache as well costs a copy and, on a VM whose balloon takes freed memory
back, a fresh page of memory for every 4 KiB. On the project's VM that was the dearest
part of a write (docs/performance.md, "Pack appends past the page cache").

So records gather in an aligned staging buffer, and a thread of the writer's own writes
each full buffer with O_DIRECT, whole pages only, while the appenders fill the next
one. Until a buffer is on the disk its bytes are served from memory (`read_staged`).
`start_flush` hands the stage to that thread and writes its last partial page through
the page cache, so the file ends at its exact length; `wait_written` then waits for the
thread, and only after both may the caller fsync and commit the pack's length.

Where O_DIRECT is refused (tmpfs, some FUSE or network filesystems), appends are plain
`pwritev`s with early writeback, as they were before.

Every method but `wait_written` is called with the PackSet's lock held.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .. import libc

log = logging.getLogger(__name__)

PAGE = 4096
# Bytes gathered before a direct write: large writes for the disk, little memory.
STAGE_SIZE = 8 * 1024 * 1024
# Full stages waiting for the disk before an append waits for one of them to be written.
MAX_QUEUED = 2
# Without O_DIRECT, appended bytes are handed to the disk in chunks of this size as they
# come, so that the fsync at commit finds little left to write.
WRITEBACK_CHUNK = 8 * 1024 * 1024


def _start_writeback_fn():
    """`sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)`: start writing a range out
    without waiting for it. The os module lacks it; without libc it is simply skipped
    (the fsync at commit then writes everything)."""
    fn = libc.function("sync_file_range",
                       [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
    if fn is None:
        return lambda fd, offset, n: None
    write = 2  # SYNC_FILE_RANGE_WRITE
    return lambda fd, offset, n: fn(fd, offset, n, write)


start_writeback = _start_writeback_fn()


def _reserve_fn():
    """`fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, n)`: give the file disk blocks past its
    end without changing its size, or raise OSError. None without libc's fallocate."""
    fn = libc.function("fallocate",
                       [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])
    if fn is None:
        return None
    keep_size = 1  # FALLOC_FL_KEEP_SIZE

    def reserve(fd: int, offset: int, n: int) -> None:
        if fn(fd, keep_size, offset, n) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return reserve


reserve_space = _reserve_fn()


def short_write() -> OSError:
    # A short write means the disk is full; bytes past the pack's length are garbage
    # that the next write overwrites and a reopened store cuts off.
    return OSError(errno.ENOSPC, "No space left on device (short write to pack)")


def open_direct(path: Path) -> int | None:
    """A descriptor writing `path` past the page cache, or None where that is refused."""
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


class StagePool:
    """Staging buffers kept from one pack to the next: a fresh buffer costs fresh memory,
    which is what the writer is there to avoid."""

    def __init__(self, stage_size: int = STAGE_SIZE, keep: int = MAX_QUEUED + 1):
        self.stage_size = stage_size
        self._keep = keep
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self, size: int | None = None) -> mmap.mmap:
        size = self.stage_size if size is None else size
        with self._lock:
            if size == self.stage_size and self._free:
                return self._free.pop()
        # An anonymous mapping is page-aligned, as O_DIRECT wants.
        return mmap.mmap(-1, size + -size % PAGE)

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(buf) == self.stage_size and len(self._free) < self._keep:
                self._free.append(buf)


@dataclass
class _Queued:
    """A full stage handed to the writing thread: the file's bytes [start, start + size)."""

    ticket: int
    buf: mmap.mmap
    start: int
    size: int


class PackWriter:
    """Appends records to one pack file of `length` bytes."""

    def __init__(self, path: Path, length: int, direct: bool = True,
                 pool: StagePool | None = None):
        self.path = path
        self.length = length
        self._fd = os.open(path, os.O_RDWR)  # the tail page, reads of it, the fallback
        self._direct_fd = open_direct(path) if direct else None
        self._written_back = length  # buffered mode: writeback started up to here
        self._flushed = length  # the stage's bytes before this are in the file too
        # The disk has given the file blocks up to here (the thread's writes cannot fail
        # for space there); None where the filesystem cannot reserve.
        self._reserved: int | None = length if reserve_space is not None else None
        self._pool = pool if pool is not None else StagePool()
        # Guards the queue and what the thread has done; the thread takes only this.
        self._mu = threading.Condition(threading.Lock())
        self._queue: collections.deque[_Queued] = collections.deque()
        self._tickets = 0  # stages handed to the thread so far
        self._done = 0  # of which written
        self._error: OSError | None = None  # the thread's last failure, until retried
        self._closing = False
        self._thread: threading.Thread | None = None
        if self._direct_fd is not None:
            # The stage holds the file's bytes from _stage_start (page-aligned) on; the
            # partial page a reopened pack ends with is read in, as direct writes of that
            # page must carry it whole.
            self._stage = self._pool.take()
            self._stage_start = length - length % PAGE
            head = os.pread(self._fd, length - self._stage_start, self._stage_start)
            self._stage[:len(head)] = head
            self._thread = threading.Thread(target=self._write_stages, daemon=True,
                                            name=f"pack writer {path.name}")
            self._thread.start()

    @property
    def direct(self) -> bool:
        return self._direct_fd is not None

    @property
    def unwritten_bytes(self) -> int:
        """Bytes appended that the disk has neither been given nor reserved room for."""
        if self._direct_fd is None or self._reserved is not None:
            return 0
        with self._mu:
            first = self._queue[0].start if self._queue else self._stage_start
        return self.length - first

    # -- appending -------------------------------------------------------------------

    def append(self, parts: tuple[bytes, ...], size: int) -> int:
        """Append one record; returns its offset."""
        offset = self.length
        if self._direct_fd is None:
            return self._append_buffered(parts, size)
        if offset - self._stage_start + size > len(self._stage):
            self._hand_over_whole_pages()
            if offset - self._stage_start + size > len(self._stage):
                self._grow_stage(offset - self._stage_start + size)
        self._reserve(offset + size)
        at = offset - self._stage_start
        for part in parts:
            self._stage[at:at + len(part)] = part
            at += len(part)
        self.length += size
        return offset

    def _reserve(self, end: int) -> None:
        """Have the disk's blocks for the file up to `end` before a record is accepted:
        a buffered write finds out about a full disk in the write() itself, but the
        thread's direct write comes later, when the record's block is already counted
        and indexed. So the space is taken now, a stage at a time; ENOSPC here appends
        nothing."""
        if self._reserved is None or end <= self._reserved:
            return
        n = max(end - self._reserved, len(self._stage))
        try:
            reserve_space(self._direct_fd, self._reserved, n)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._reserved = None  # this filesystem cannot: the write finds out, later
            return
        self._reserved += n

    def _append_buffered(self, parts: tuple[bytes, ...], size: int) -> int:
        offset = self.length
        written = os.pwritev(self._fd, parts, offset)
        if written != size:
            raise short_write()
        self.length += written
        if self.length - self._written_back >= WRITEBACK_CHUNK:
            start_writeback(self._fd, self._written_back, self.length - self._written_back)
            self._written_back = self.length
        return offset

    def _grow_stage(self, need: int) -> None:
        # Only for a record larger than a stage (a store with very large blocks).
        bigger = self._pool.take(need)
        staged = self.length - self._stage_start
        bigger[:staged] = self._stage[:staged]
        self._stage = bigger

    def _hand_over_whole_pages(self) -> int:
        """Queue the stage's whole pages for the thread, keep its partial last page in a
        fresh stage; returns the ticket that `wait_written` waits for."""
        staged = self.length - self._stage_start
        whole = staged - staged % PAGE
        with self._mu:
            if not whole:
                return self._tickets
            while len(self._queue) >= MAX_QUEUED and self._error is None:
                self._mu.wait()
            self._raise_error_locked()
            new = self._pool.take()
            self._tickets += 1
            self._queue.append(_Queued(self._tickets, self._stage, self._stage_start, whole))
            self._mu.notify_all()
            ticket = self._tickets
        tail = staged - whole
        new[:tail] = self._stage[whole:staged]
        self._stage, self._stage_start = new, self._stage_start + whole
        return ticket

    def _raise_error_locked(self) -> None:
        """Raise the thread's failure (once) and let it retry the stage it failed on."""
        if self._error is not None:
            error, self._error = self._error, None
            self._mu.notify_all()
            raise OSError(error.errno, error.strerror)

    # -- the writing thread ----------------------------------------------------------

    def _write_stages(self) -> None:
        while True:
            with self._mu:
                while not self._closing and (not self._queue or self._error is not None):
                    self._mu.wait()
                if not self._queue:
                    return
                item = self._queue[0]
            try:
                self._write_stage(item)
            except OSError as e:
                log.warning("writing %s at %d failed: %s", self.path, item.start, e)
                with self._mu:
                    self._error = e
                    self._mu.notify_all()
                continue
            with self._mu:
                if self._queue and self._queue[0] is item:  # else dropped by close()
                    self._queue.popleft()
                self._done = max(self._done, item.ticket)
                self._pool.give(item.buf)
                self._mu.notify_all()

    def _write_stage(self, item: _Queued) -> None:
        view = memoryview(item.buf)[:item.size]
        try:
            written = os.pwrite(self._direct_fd, view, item.start)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # Opened with O_DIRECT, but the write is refused (an alignment this
            # filesystem does not take): the page cache it is, for this stage.
            written = os.pwrite(self._fd, view, item.start)
        finally:
            view.release()
        if written != item.size:
            raise short_write()

    # -- flushing --------------------------------------------------------------------

    def start_flush(self) -> int:
        """Put every appended byte on its way to the file: whole pages to the thread, the
        partial last page through the page cache. Returns the ticket to wait for."""
        if self._direct_fd is None:
            return 0
        ticket = self._hand_over_whole_pages()
        tail = self.length - self._stage_start
        if tail:
            # The file then ends exactly at its length; the next direct write of this page
            # replaces it there too.
            written = os.pwrite(self._fd, memoryview(self._stage)[:tail], self._stage_start)
            if written != tail:
                raise short_write()
            self._flushed = self.length
        return ticket

    def wait_written(self, ticket: int) -> None:
        """Wait (without the PackSet's lock) until the thread has written the stages up to
        `ticket`. Raises its failure, if it failed on one of them; the stage stays queued,
        and the next wait retries it."""
        with self._mu:
            while self._done < ticket:
                if self._error is not None:
                    self._raise_error_locked()
                self._mu.wait()

    def flush(self) -> None:
        self.wait_written(self.start_flush())

    # -- reading ---------------------------------------------------------------------

    def read_staged(self, offset: int, length: int) -> bytes | bytearray | None:
        """The bytes [offset, offset + length) if any of them is not in the file yet, else
        None: the file has them, and reads must see the file (where a damaged disk
        shows), not our memory of it."""
        if self._direct_fd is None:
            return None
        end = min(offset + length, self.length)
        with self._mu:
            unwritten = [(q.start, q.size, q.buf) for q in self._queue]
        in_file = max(self._stage_start, self._flushed)
        unwritten.append((in_file, self.length - in_file, self._stage))
        unwritten = [(start, size, buf) for start, size, buf in unwritten
                     if start < end and offset < start + size and size > 0]
        if not unwritten:
            return None
        out = bytearray(os.pread(self._fd, end - offset, offset).ljust(end - offset, b"\0"))
        for start, size, buf in unwritten:
            lo, hi = max(offset, start), min(end, start + size)
            at = lo - start + (start - self._stage_start if buf is self._stage else 0)
            out[lo - offset:hi - offset] = buf[at:at + hi - lo]
        return out

    # -- closing ---------------------------------------------------------------------

    def close(self, keep_staged: bool = True) -> None:
        """Close the descriptors, once what is staged is in the file (unless the pack is
        being removed). If that write fails, the writer stays open and keeps it."""
        if keep_staged:
            self.flush()
            if self._reserved is not None and self._reserved > self.length:
                # Give back the blocks reserved past the end (a same-size truncate does).
                os.ftruncate(self._fd, self.length)
        if self._thread is not None:
            with self._mu:
                if not keep_staged:
                    self._queue.clear()
                    self._done = self._tickets  # nothing left for a sync to wait for
                self._closing = True
                self._error = None
                self._mu.notify_all()
            self._thread.join()
            self._pool.give(self._stage)
        for fd in (self._fd, self._direct_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._direct_fd = None
