"""Kernel inode numbers and the attributes the kernel is given for them.

Live objects use their namespace inode number as is (always below 2**48). An object seen
through a snapshot is `slot << 48 | ino`, where `slot` (1..65535) is a number the mount
gives each snapshot: a live file and its snapshot copies never share an `st_ino`, so
`cp -a`, `tar` and `rsync -H` never take one for a hard link of the other.
"""

from __future__ import annotations

import stat

import pyfuse3

SLOT_SHIFT = 48
INO_MASK = (1 << SLOT_SHIFT) - 1
MAX_SLOT = (1 << 16) - 1

# The virtual /snapshots directory: the largest live-range number, never handed out by
# the namespace (which counts up from 2).
SNAPSHOTS_DIR_INO = INO_MASK
SNAPSHOTS_DIR_NAME = b"snapshots"
LATEST_NAME = b"latest"
# `latest` symlink inside /snapshots.
LATEST_INO = INO_MASK - 1

# Live objects change only through this mount, so the kernel may keep what it was told
# for long; snapshot objects never change at all.
LIVE_TIMEOUT = 300.0
SNAPSHOT_TIMEOUT = 86400.0


def split(kernel_ino: int) -> tuple[int, int]:
    """(slot, namespace ino); slot 0 is the live tree."""
    return kernel_ino >> SLOT_SHIFT, kernel_ino & INO_MASK


def join(slot: int, ino: int) -> int:
    return (slot << SLOT_SHIFT) | ino


def entry_attributes(attr, kernel_ino: int, block_size: int, timeout: float,
                     pending_blocks: int = 0) -> pyfuse3.EntryAttributes:
    """pyfuse3 attributes from a namespace `Attr`."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = kernel_ino
    e.generation = 0
    e.entry_timeout = timeout
    e.attr_timeout = timeout
    e.st_mode = attr.mode
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_rdev = attr.rdev
    e.st_size = attr.size
    e.st_blksize = block_size
    # Stored blocks plus those still buffered (as ext4 counts delayed allocations: a
    # written file must never look all holes, or `tar -S` archives it empty), but never
    # more than the file's size: `du` of a 4 KiB file says 4 KiB, not a whole block.
    blocks = (attr.stored_blocks + pending_blocks) * (block_size // 512)
    e.st_blocks = min(blocks, -(-attr.size // 512))
    e.st_atime_ns = attr.atime_ns
    e.st_mtime_ns = attr.mtime_ns
    e.st_ctime_ns = attr.ctime_ns
    return e


def negative_entry(timeout: float) -> pyfuse3.EntryAttributes:
    """The answer to a lookup of a name that does not exist, which the kernel caches for
    `timeout` seconds (an ENOENT error it would ask again for at every open or stat)."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = 0
    e.entry_timeout = timeout
    return e


def is_dir(mode: int) -> bool:
    return stat.S_ISDIR(mode)
