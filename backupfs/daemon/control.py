"""The daemon side of the control socket (`STORE/control.sock`, mode 0600, or 0660 with
the group set by `--control-group` or `[control] group` in config.toml).

Each connection carries one request; operations run in the daemon's trio loop, so they
see and change the same state as the FUSE handlers.
"""

from __future__ import annotations

import grp
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


def control_group(name: str | None, config: dict) -> int | None:
    """The gid allowed to use the control socket: `name` (from --control-group), else
    `[control] group` in config.toml, else None (root only)."""
    if name is None:
        table = config.get("control", {})
        if not isinstance(table, dict):
            raise BackupfsError("config.toml [control]: must be a table")
        name = table.get("group")
        if name is None:
            return None
    name = str(name)
    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise BackupfsError(f"control group {name!r}: no such group") from None


def share_store(store_path: Path, gid: int | None) -> None:
    """Let the control group reach STORE/control.sock and nothing else: the store
    directory becomes 0710 root:GROUP and its entries lose group and other permissions
    (the index would otherwise show every file name). Without a group, back to 0700."""
    store_path = Path(store_path)
    if gid is None:
        if store_path.stat().st_mode & 0o077:
            os.chmod(store_path, 0o700)
        return
    for entry in store_path.iterdir():
        if entry.name == SOCKET_NAME or entry.is_symlink():
            continue
        mode = entry.stat().st_mode
        if mode & 0o077:
            os.chmod(entry, mode & 0o7700)
    os.chown(store_path, -1, gid)
    os.chmod(store_path, 0o710)


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
            op = None
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
            except OSError as e:
                # A full disk or a failed writeback: the user's to fix, not a daemon bug.
                log.warning("control %s: %s", op, e.strerror or e)
                answer = {"ok": False, "error": e.strerror or str(e), "errno": e.errno}
            except Exception as e:
                log.exception("control request failed")
                answer = {"ok": False, "error": f"internal error: {e}"}
            try:
                await stream.send_all(encode(answer))
            except trio.BrokenResourceError:
                pass
