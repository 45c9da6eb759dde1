"""What the baseline filesystems (tools/memfs.py, tools/passthroughfs.py) share: mounting
one configured as backupfs's mount is, and serving it until it is unmounted."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backupfs.daemon.mountinfo import set_read_ahead_once_serving  # noqa: E402
from backupfs.daemon.serve import READ_AHEAD_KB  # noqa: E402


def serve(name: str, ops: pyfuse3.Operations, mountpoint: Path, options: Iterable[str],
          background: Iterable[Callable[[], Awaitable[None]]] = ()) -> None:
    """Mount `ops` at `mountpoint` with pyfuse3's default options, `-o` `options` and
    backupfs's read-ahead, and serve it in the foreground, with the `background` tasks
    beside it, until it is unmounted."""
    opts = set(pyfuse3.default_options) | {f"fsname={name}", f"subtype={name}"}
    opts |= {o for v in options for o in v.split(",") if o}
    pyfuse3.init(ops, str(mountpoint), opts)

    async def read_ahead() -> None:
        try:
            await set_read_ahead_once_serving(mountpoint, READ_AHEAD_KB)
        except OSError as e:
            print(f"{name}: read-ahead left at the kernel's default: {e}", file=sys.stderr)

    async def main_loop() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_ahead)
            for task in background:
                nursery.start_soon(task)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()  # a background task may wait for work forever

    try:
        trio.run(main_loop)
    finally:
        pyfuse3.close(unmount=True)
