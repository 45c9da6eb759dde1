"""`NamespaceView`: the tree as it is at one epoch, read-only.

A snapshot view is frozen at the snapshot's epoch; the live view (see live.py) is the same
code reading at the current epoch. Lookups that fail raise OSError with the errno the
filesystem passes on.
"""

from __future__ import annotations

import errno
import stat
from typing import TYPE_CHECKING, Iterator

from . import records as rec
from .records import Attr
from .versions import after_all_versions

if TYPE_CHECKING:
    from .namespace import Namespace


def fail(code: int, what: str = "") -> OSError:
    return OSError(code, f"{errno.errorcode.get(code, code)}{': ' if what else ''}{what}")


class NamespaceView:
    def __init__(self, ns: "Namespace", epoch: int | None):
        self.ns = ns
        self._epoch = epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def readonly(self) -> bool:
        return True

    # -- inodes ----------------------------------------------------------------------

    def getattr(self, ino: int) -> Attr:
        v = self.ns.inodes.read(rec.inode_prefix(ino), self.epoch)
        if v is None:
            raise fail(errno.ENOENT, f"inode {ino}")
        return self._decode_inode(ino, v)

    def _decode_inode(self, ino: int, v: bytes) -> Attr:
        return rec.unpack_inode(ino, v)

    def readlink(self, ino: int) -> bytes:
        attr = self.getattr(ino)
        if not stat.S_ISLNK(attr.mode):
            raise fail(errno.EINVAL, "not a symlink")
        return attr.target

    # -- directories -----------------------------------------------------------------

    def child(self, parent: int, name: bytes) -> int | None:
        v = self.ns.entries.read(rec.entry_prefix(parent, name), self.epoch)
        return None if v is None else rec.U64.unpack(v)[0]

    def lookup(self, parent: int, name: bytes) -> Attr:
        ino = self.child(parent, name)
        if ino is None:
            raise fail(errno.ENOENT, repr(name))
        return self.getattr(ino)

    def readdir(self, ino: int, after: bytes | None = None) -> Iterator[tuple[bytes, Attr]]:
        """(name, Attr) of a directory's entries in byte order of name, after `after`.

        Resuming after a name (not a position) keeps a listing correct while entries
        come and go between calls.
        """
        group = rec.U64.pack(ino)
        start = None if after is None else after_all_versions(rec.entry_prefix(ino, after))
        for prefix, v in self.ns.entries.scan(group, self.epoch, start):
            yield rec.entry_name(prefix), self.getattr(rec.U64.unpack(v)[0])

    def names(self, ino: int) -> Iterator[bytes]:
        """A directory's names in byte order (readdir without the attributes)."""
        for prefix, _ in self.ns.entries.scan(rec.U64.pack(ino), self.epoch, None):
            yield rec.entry_name(prefix)

    def is_empty_dir(self, ino: int) -> bool:
        return next(self.names(ino), None) is None

    # -- file contents ---------------------------------------------------------------

    def block_hash(self, ino: int, n: int) -> bytes | None:
        """The hash of block n of a file, or None for a hole."""
        return self.ns.blockmap.read(rec.block_prefix(ino, n), self.epoch)

    def block_range(self, ino: int, first: int = 0) -> Iterator[tuple[int, bytes]]:
        """(block number, hash) of every stored block of a file from `first` on."""
        group = rec.U64.pack(ino)
        for prefix, h in self.ns.blockmap.scan(group, self.epoch, rec.block_prefix(ino, first)):
            yield rec.block_number(prefix), h

    # -- extended attributes ---------------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        v = self.ns.xattrs.read(rec.xattr_prefix(ino, name), self.epoch)
        if v is None:
            raise fail(errno.ENODATA, repr(name))
        return v[1:]

    def listxattr(self, ino: int) -> list[bytes]:
        return [rec.xattr_name(p) for p, _ in
                self.ns.xattrs.scan(rec.U64.pack(ino), self.epoch)]
