"""Transaction groups: when metadata and block bytes become durable together.

A group closes on `fsync`, on a snapshot, on the periodic timer and at unmount. The slow
part, fsyncing pack files, runs in a worker thread so the FUSE loop keeps serving; the
LMDB commit itself must run in the thread that owns the write transaction, and it first
syncs whatever was appended while the worker ran, so a committed index never points at
bytes that are not on disk.
"""

from __future__ import annotations

import contextlib

import trio

from ..store import Store


class TransactionGroups:
    def __init__(self, store: Store, seal=None):
        self.store = store
        # Awaited before every commit (the filesystem seals its dirty blocks there), so a
        # committed file size never outruns the file's data.
        self.seal = seal
        # Entered around a commit whose seal failed: the filesystem's sizes as stored.
        self.sizes_as_stored = contextlib.nullcontext
        # Entered (async) around every commit of the store: the filesystem holds back
        # changes made in several steps with requests served between them (a big
        # truncate), so that none is committed half done.
        self.hold_still = contextlib.nullcontext
        self._lock = trio.Lock()
        self.commits = 0

    async def commit(self, seal: bool = True) -> None:
        """Seal (unless `seal` is False), sync the packs, commit. A seal that fails for
        a full disk still commits the metadata (with file sizes as far as their bytes
        are stored), then raises its OSError."""
        async with self._lock:
            failed = None
            if seal and self.seal is not None:
                try:
                    await self.seal()
                except OSError as e:
                    # A full disk: the bytes stay buffered (and are retried), but the
                    # metadata, deletes that free space above all, must still commit.
                    failed = e
            async with self.hold_still():
                plan = self.store.packs.plan_sync()
                if plan.files or plan.dirs:
                    await trio.to_thread.run_sync(self.store.packs.run_plan, plan)
                self.store.packs.record_synced(plan)
                cut = self.sizes_as_stored if failed is not None else contextlib.nullcontext
                with cut():
                    self.store.commit()
            self.commits += 1
            if failed is not None:
                raise failed
