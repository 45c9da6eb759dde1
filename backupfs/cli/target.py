"""Resolving the MOUNTPOINT-or-STORE argument most commands take."""

from __future__ import annotations

from pathlib import Path

from ..daemon.mountinfo import find_mount
from ..errors import BackupfsError


def resolve_store(target: str) -> Path:
    """The store behind a mountpoint, or the store directory itself."""
    m = find_mount(target)
    if m is not None:
        return m.store
    p = Path(target)
    if (p / "config.toml").is_file():
        return p.resolve()
    if not p.exists():
        raise BackupfsError(f"{target}: no such file or directory")
    raise BackupfsError(f"{target}: not a backupfs mount or store")
