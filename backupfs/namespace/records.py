"""The records of the namespace and how they are packed into LMDB keys and values.

Keys are big-endian so LMDB's byte order is the scan order. Every versioned key ends in
the inverted epoch (`~e`) of the version, so the newest version of a key sorts first and
`set_range(prefix + ~s)` lands on the newest version visible at epoch s.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields

U64 = struct.Struct(">Q")
MAX_EPOCH = (1 << 64) - 1
ROOT_INO = 1

# An empty value is a tombstone in every versioned table: "absent from this epoch on".
TOMBSTONE = b""

# inode value: mode, uid, gid, size, nlink, rdev, atime, mtime, ctime (ns), stored blocks,
# parent (the directory it was last created, linked or renamed into: the rename-into-own-
# subtree check walks it up, diff finds paths with it); a symlink's target follows.
_INODE = struct.Struct(">IIIQIQqqqQQ")


# Treated as immutable (change it with `changed`), but not frozen: a frozen dataclass's
# __init__ sets each field through object.__setattr__, and building Attrs was most of a
# `readdir`'s cost (10.2 -> 7.2 us an entry without it, measured).
@dataclass(slots=True, unsafe_hash=True)
class Attr:
    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    stored_blocks: int = 0
    parent: int = 0
    target: bytes = b""

    def changed(self, **changes) -> "Attr":
        # Not dataclasses.replace, which checks every field's init flag first: this is a
        # third cheaper, and a small-file create changes its attributes four times.
        values = {name: getattr(self, name) for name in _ATTR_FIELDS}
        values.update(changes)
        return Attr(**values)


_ATTR_FIELDS = tuple(f.name for f in fields(Attr))


def pack_inode(a: Attr) -> bytes:
    return _INODE.pack(a.mode, a.uid, a.gid, a.size, a.nlink, a.rdev, a.atime_ns,
                       a.mtime_ns, a.ctime_ns, a.stored_blocks, a.parent) + a.target


def unpack_inode(ino: int, v: bytes) -> Attr:
    fields = _INODE.unpack_from(v)
    return Attr(ino, *fields, target=bytes(v[_INODE.size:]))


def version_key(prefix: bytes, epoch: int) -> bytes:
    return prefix + U64.pack(MAX_EPOCH - epoch)


def split_version_key(key: bytes) -> tuple[bytes, int]:
    return key[:-8], MAX_EPOCH - U64.unpack(key[-8:])[0]


# Prefixes (the key without its epoch) of each table.

def inode_prefix(ino: int) -> bytes:
    return U64.pack(ino)


def entry_prefix(parent: int, name: bytes) -> bytes:
    # Names never hold NUL, so NUL ends the name and keeps names in byte order.
    return U64.pack(parent) + name + b"\0"


def entry_name(prefix: bytes) -> bytes:
    return prefix[8:-1]


def block_prefix(ino: int, n: int) -> bytes:
    return U64.pack(ino) + U64.pack(n)


def block_number(prefix: bytes) -> int:
    return U64.unpack_from(prefix, 8)[0]


xattr_prefix = entry_prefix
xattr_name = entry_name
# xattr values may be empty, and empty means tombstone: stored with one leading byte.
XATTR_PRESENT = b"\x01"
