"""A plain in-memory model of the namespace, and helpers that read a real namespace into
the same shape, for comparing the two (tests/test_namespace_*.py)."""

from __future__ import annotations

import copy
import errno
import stat
from dataclasses import dataclass, field

from backupfs.namespace import ROOT_INO
from backupfs.namespace.check import check_versions


@dataclass
class MInode:
    ino: int
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    nlink: int = 1
    atime_ns: int = 0
    target: bytes = b""
    blocks: dict[int, bytes] = field(default_factory=dict)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    parent: int = ROOT_INO  # the directory it was last created, linked or renamed into


class Model:
    """The tree as dicts: directories map names to inode numbers."""

    def __init__(self, root):
        self.inodes: dict[int, MInode] = {ROOT_INO: MInode(
            ROOT_INO, root.mode, root.uid, root.gid, root.size, root.nlink, root.atime_ns)}
        self.dirs: dict[int, dict[bytes, int]] = {ROOT_INO: {}}

    def copy(self) -> "Model":
        return copy.deepcopy(self)

    def is_dir(self, ino: int) -> bool:
        return stat.S_ISDIR(self.inodes[ino].mode)

    def reachable(self) -> dict[bytes, int]:
        """path -> ino of everything below the root."""
        out = {}

        def walk(ino, path):
            for name, child in sorted(self.dirs[ino].items()):
                out[path + b"/" + name] = child
                if self.is_dir(child):
                    walk(child, path + b"/" + name)

        walk(ROOT_INO, b"")
        return out

    def recorded_path(self, ino: int) -> bytes | None:
        """What namespace.paths.path_of gives: the path of ino's recorded directory and
        the first name there that names it, or None where there is none."""
        names = [p for p, i in self.reachable().items()
                 if i == ino and p.rpartition(b"/")[0] == self.dir_path(self.inodes[ino].parent)]
        return min(names) if names else None

    def dir_path(self, d: int) -> bytes | None:
        if d == ROOT_INO:
            return b""
        return next((p for p, i in self.reachable().items() if i == d), None)

    def is_ancestor(self, a: int, ino: int) -> bool:
        """Directory a is ino or above it."""
        parents = {c: p for p, d in self.dirs.items() for c in d.values() if self.is_dir(c)}
        while True:
            if ino == a:
                return True
            if ino == ROOT_INO:
                return False
            ino = parents[ino]

    def describe(self, ino: int, block_size: int) -> tuple:
        i = self.inodes[ino]
        nblocks = -(-i.size // block_size)
        return (i.mode, i.uid, i.gid, i.size, i.nlink, i.atime_ns, i.target,
                tuple(sorted((n, h) for n, h in i.blocks.items() if n < nblocks)),
                tuple(sorted(i.xattrs.items())))


def describe_view(view, block_size: int) -> tuple[dict[bytes, int], dict[int, tuple]]:
    """(path -> ino, ino -> description) of a namespace view, read through every query."""
    paths: dict[bytes, int] = {}
    described: dict[int, tuple] = {}

    def describe(attr) -> tuple:
        blocks = tuple(view.block_range(attr.ino))
        nblocks = -(-attr.size // block_size)
        # block_range and block_hash must agree, holes included.
        assert tuple((n, view.block_hash(attr.ino, n)) for n in range(nblocks)
                     if view.block_hash(attr.ino, n) is not None) == blocks
        # st_blocks comes from this count, kept by write_block(s) and truncation.
        assert attr.stored_blocks == len(blocks), f"inode {attr.ino}"
        xattrs = tuple(sorted((n, view.getxattr(attr.ino, n)) for n in view.listxattr(attr.ino)))
        target = view.readlink(attr.ino) if stat.S_ISLNK(attr.mode) else b""
        return (attr.mode, attr.uid, attr.gid, attr.size, attr.nlink, attr.atime_ns, target,
                blocks, xattrs)

    def walk(ino: int, path: bytes) -> None:
        for name, attr in view.readdir(ino):
            assert view.lookup(ino, name) == attr
            paths[path + b"/" + name] = attr.ino
            described[attr.ino] = describe(attr)
            if stat.S_ISDIR(attr.mode):
                walk(attr.ino, path + b"/" + name)

    described[ROOT_INO] = describe(view.getattr(ROOT_INO))
    walk(ROOT_INO, b"")
    return paths, described


def assert_view_matches(view, model: Model, block_size: int) -> None:
    paths, described = describe_view(view, block_size)
    expect_paths = model.reachable()
    assert paths == expect_paths
    for ino in set(expect_paths.values()) | {ROOT_INO}:
        assert described[ino] == model.describe(ino, block_size), f"inode {ino}"


def check_versions_exact(ns) -> dict[bytes, int]:
    """GC exactness: no stored version is invisible, no tombstone needless, the deadlist
    exact (see backupfs.namespace.check). Returns block hash -> references held."""
    report = check_versions(ns)
    assert not report.issues, "\n".join(map(str, report.issues))
    return report.block_refs


def expect_errno(code: int | None, fn, *args, **kw):
    """Call fn; it must raise OSError(code), or succeed when code is None."""
    try:
        result = fn(*args, **kw)
    except OSError as e:
        assert code is not None, f"unexpected {errno.errorcode.get(e.errno)}: {e}"
        assert e.errno == code, f"expected {errno.errorcode[code]}, got {errno.errorcode.get(e.errno)}"
        return None
    assert code is None, f"expected {errno.errorcode[code]}, got success"
    return result
