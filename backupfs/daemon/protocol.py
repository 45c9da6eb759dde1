"""The control socket protocol: one JSON object per line each way.

Request:  {"op": "snapshot", "label": "before upgrade", "hold": false}
Answer:   {"ok": true, "result": ...}  or  {"ok": false, "error": "one-line message"}

`ControlClient` is the synchronous client the CLI uses.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from ..errors import BackupfsError

SOCKET_NAME = "control.sock"
MAX_LINE = 16 * 1024 * 1024


class DaemonError(BackupfsError):
    """The daemon answered a request with an error; `errno` is set when storing or
    writing back failed there (a full disk, say)."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class NoDaemon(BackupfsError):
    """Nothing is listening on the store's control socket."""


def encode(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class ControlClient:
    def __init__(self, store: Path, timeout: float | None = None):
        self.path = Path(store) / SOCKET_NAME
        self.timeout = timeout

    def _denied(self) -> BackupfsError:
        return BackupfsError(f"{self.path}: permission denied (run as root, or as a "
                             f"member of the store's control group)")

    def call(self, op: str, **args):
        try:
            if not self.path.exists():
                raise NoDaemon(
                    f"{self.path.parent}: no backupfs daemon is running for this store")
        except PermissionError:
            raise self._denied() from None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            try:
                s.connect(str(self.path))
            except (ConnectionRefusedError, FileNotFoundError):
                raise NoDaemon(
                    f"{self.path.parent}: no backupfs daemon is running for this store") from None
            except PermissionError:
                raise self._denied() from None
            s.sendall(encode({"op": op, **args}))
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise DaemonError("the daemon closed the connection without answering")
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise DaemonError("answer too long")
        finally:
            s.close()
        answer = json.loads(buf)
        if not answer.get("ok"):
            raise DaemonError(answer.get("error", "unknown error"), answer.get("errno"))
        return answer.get("result")
