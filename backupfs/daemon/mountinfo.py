"""Finding backupfs mounts in /proc/self/mountinfo.

A backupfs mount has filesystem type `fuse.backupfs` and source `backupfs:STORE`, so the
CLI can go from a mountpoint to its store and back without any state of its own.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import trio

FSTYPE = "fuse.backupfs"
SOURCE_PREFIX = "backupfs:"

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class Mount:
    mountpoint: Path
    store: Path
    options: str


def _mountinfo(mountinfo: str) -> Iterator[tuple[list[str], list[str]]]:
    """Each mount's fields before and after the " - " separator (none if unreadable)."""
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for line in lines:
        left, _, right = line.partition(" - ")
        yield left.split(), right.split()


def backupfs_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[Mount]:
    out = []
    for fields, rest in _mountinfo(mountinfo):
        if len(fields) < 6 or len(rest) < 2 or rest[0] != FSTYPE:
            continue
        source = _unescape(rest[1])
        if not source.startswith(SOURCE_PREFIX):
            continue
        out.append(Mount(Path(_unescape(fields[4])), Path(source[len(SOURCE_PREFIX):]), fields[5]))
    return out


def mount_device(mountpoint: Path, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The "major:minor" of whatever is mounted exactly at `mountpoint` (any type),
    read without touching the mount itself (which may not answer yet)."""
    found = None
    for fields, _ in _mountinfo(mountinfo):
        if len(fields) > 4 and Path(_unescape(fields[4])) == mountpoint:
            found = fields[2]  # the last one listed is the one on top
    return found


async def set_read_ahead_once_serving(mountpoint: Path, kb: int) -> None:
    """Set the kernel's read-ahead for the FUSE mount at `mountpoint`, served by this
    process's trio loop (root only; OSError otherwise).

    It waits until the mount answered a request: the kernel caps the setting at what
    the INIT reply allows (128 KiB) when that reply arrives."""
    await trio.to_thread.run_sync(os.stat, mountpoint)
    device = mount_device(mountpoint)
    if device is None:
        raise OSError(f"{mountpoint}: not a mountpoint")
    Path("/sys/class/bdi", device, "read_ahead_kb").write_text(f"{kb}\n")


def find_mount(mountpoint: str | os.PathLike) -> Mount | None:
    """The backupfs mount at `mountpoint` (exactly there), or None."""
    target = Path(os.path.realpath(mountpoint))
    for m in backupfs_mounts():
        if m.mountpoint == target:
            return m
    return None


def mounts_of_store(store: str | os.PathLike) -> list[Mount]:
    target = Path(os.path.realpath(store))
    return [m for m in backupfs_mounts() if Path(os.path.realpath(m.store)) == target]
