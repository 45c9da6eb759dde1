"""The daemon side of the control socket (`STORE/control.sock`, mode 0600).

Each connection carries one request; operations run in the daemon's trio loop, so they
see and change the same state as the FUSE handlers.
"""

from __future__ import annotations

import json
import logging
import os
import socket as stdlib_socket
from datetime import datetime, timezone
from pathlib import Path

import trio

from ..errors import BackupfsError
from .protocol import MAX_LINE, SOCKET_NAME, encode

log = logging.getLogger("backupfs.control")


def snapshot_dict(r) -> dict:
    created = datetime.fromtimestamp(r.created_ns / 1e9, timezone.utc)
    return {"id": r.id, "name": r.name, "label": r.label,
            "created": created.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "created_ns": r.created_ns, "epoch": r.epoch, "hold": r.hold}


class ControlServer:
    def __init__(self, daemon, store_path: Path, mode: int = 0o600, group: int | None = None):
        self.daemon = daemon
        self.path = Path(store_path) / SOCKET_NAME
        self.mode = mode
        self.group = group

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # We hold the store lock: a socket file left here is from a dead daemon.
        self.path.unlink(missing_ok=True)
        sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        if self.group is not None:
            os.chown(self.path, -1, self.group)
        os.chmod(self.path, self.mode)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        try:
            await trio.serve_listeners(self._handle, [listener])
        finally:
            self.path.unlink(missing_ok=True)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            try:
                while not buf.endswith(b"\n"):
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    buf += chunk
                    if len(buf) > MAX_LINE:
                        raise BackupfsError("request too long")
                request = json.loads(buf)
                op = request.pop("op")
                handler = getattr(self.daemon, f"control_{op}", None)
                if handler is None:
                    raise BackupfsError(f"unknown operation {op!r}")
                result = await handler(**request)
                answer = {"ok": True, "result": result}
            except (BackupfsError, ValueError, KeyError, TypeError) as e:
                answer = {"ok": False, "error": str(e) or type(e).__name__}
            except Exception as e:
                log.exception("control request failed")
                answer = {"ok": False, "error": f"internal error: {e}"}
            try:
                await stream.send_all(encode(answer))
            except trio.BrokenResourceError:
                pass
