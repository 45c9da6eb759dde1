"""Which files use given blocks, in the live tree and every snapshot, at the cost of what
changed between them.

`verify` names every path that uses a bad block. Walking every view for that costs
snapshots x files, and it is needed just when a disk starts to fail: a year of daily
snapshots of a million files would be hours. A view's block map differs from the one
before it only where a version was born between them (the births index; see
snapshot_trees.py), so the oldest view's block map is read whole once, and each later
view is the one before it plus those births.

Paths come from the parent an inode records and the entry there that names it, one
pass over each such directory per view (namespace/paths.py), and directories' paths are
cached per view. A file with more than one name, or whose recorded parent does not name
it, is looked for by walking that view's tree, as all of them once were.
"""

from __future__ import annotations

import stat
from collections import Counter
from typing import Iterable, Iterator

from ..namespace import ROOT_INO
from ..namespace.paths import dir_path, names_in
from ..namespace.records import U64


def users_by_view(ns, epochs: list[int], wanted: set[bytes]
                  ) -> Iterator[tuple[int, dict[int, set[bytes]]]]:
    """For each of `epochs` (ascending): the files whose block map names any of the
    `wanted` hashes there, with the hashes each names (files that have no name in the
    view included: `paths` leaves them out)."""
    refs: dict[int, Counter] = {}
    before = None
    for epoch in epochs:
        if before is None:
            for prefix, h in ns.blockmap.scan(b"", epoch):
                if h in wanted:
                    refs.setdefault(U64.unpack_from(prefix)[0], Counter())[h] += 1
        else:
            for prefix in _blockmap_births(ns, before + 1, epoch):
                ino = U64.unpack_from(prefix)[0]
                for h, sign in ((ns.blockmap.read(prefix, before), -1),
                                (ns.blockmap.read(prefix, epoch), 1)):
                    if h in wanted:
                        counts = refs.setdefault(ino, Counter())
                        counts[h] += sign
                        if counts[h] == 0:
                            del counts[h]
                            if not counts:
                                del refs[ino]
        before = epoch
        yield epoch, {ino: set(c) for ino, c in refs.items()}


def _blockmap_births(ns, first: int, last: int) -> Iterator[bytes]:
    table = ns.blockmap.table_id
    return (prefix for _, table_id, prefix, _ in ns.births.walk(first, last)
            if table_id == table)


def paths(ns, view, inos: Iterable[int]) -> dict[int, list[bytes]]:
    """Every path in `view` of each regular file of `inos` that has a name there."""
    by_parent: dict[int, set[int]] = {}
    lost = set()
    for ino in inos:
        try:
            attr = view.getattr(ino)
        except OSError:
            continue
        if not stat.S_ISREG(attr.mode) or attr.nlink == 0:
            continue
        if attr.nlink == 1:
            by_parent.setdefault(attr.parent, set()).add(ino)
        else:
            lost.add(ino)
    found: dict[int, list[bytes]] = {}
    dirs: dict[int, bytes | None] = {ROOT_INO: b""}
    for parent, children in by_parent.items():
        names = names_in(ns, view, parent, children)  # one pass over a big directory
        where = dir_path(ns, view, parent, dirs)
        for ino in children:
            if where is None or ino not in names:
                lost.add(ino)  # its recorded parent does not name it
            else:
                found[ino] = [where + b"/" + names[ino]]
    if lost:
        for path, attr in walk_files(view):
            if attr.ino in lost:
                found.setdefault(attr.ino, []).append(path)
    return found


def walk_files(view):
    """(path, Attr) of every regular file in a view, depth first."""
    stack = [(ROOT_INO, b"")]
    while stack:
        ino, path = stack.pop()
        for name, attr in view.readdir(ino):
            p = path + b"/" + name
            if stat.S_ISDIR(attr.mode):
                stack.append((attr.ino, p))
            elif stat.S_ISREG(attr.mode):
                yield p, attr
