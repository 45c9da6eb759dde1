"""A gate that lets a snapshot see a point in time.

Every handler that changes the live tree passes through `gate.changing()`. A snapshot
closes the gate: new changes wait at the gate, changes already inside finish, then the
snapshot seals all buffers and records its epoch with nothing moving, and the gate opens.
So each snapshot holds every change that completed before it and none that began after.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio


class ChangeGate:
    def __init__(self):
        self._inside = 0
        self._open = trio.Event()
        self._open.set()
        self._drained: trio.Event | None = None
        self._closer = trio.Lock()

    @asynccontextmanager
    async def changing(self):
        while not self._open.is_set():
            await self._open.wait()
        self._inside += 1
        try:
            yield
        finally:
            self._inside -= 1
            if self._inside == 0 and self._drained is not None:
                self._drained.set()

    @asynccontextmanager
    async def closed(self):
        """Hold the live tree still for the body of the `async with`."""
        async with self._closer:
            self._open = trio.Event()
            try:
                while self._inside:
                    self._drained = trio.Event()
                    await self._drained.wait()
                self._drained = None
                yield
            finally:
                self._open.set()
