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
    try:
        if (p / "config.toml").is_file():
            return p.resolve()
    except PermissionError:
        raise BackupfsError(f"{target}: permission denied (run as root, or as a member "
                            f"of the store's control group)") from None
    if not p.exists():
        raise BackupfsError(f"{target}: no such file or directory")
    raise BackupfsError(f"{target}: not a backupfs mount or store")
