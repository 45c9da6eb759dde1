"""The path of an inode in a view, from the directory it records, without a walk.

An inode records the directory it was last created, linked or renamed into (records.py),
so its path is that directory's entry naming it, after the directory's own path: one
pass over each directory on the way up to the root. A file none of whose names is in that
directory (a hard link moved away, then that name removed) has no path by this means.
`backupfs verify` uses it to name the files that use a bad block; the filesystem, to
name the file whose block failed a read.
"""

from __future__ import annotations

from .records import ROOT_INO, U64, entry_name


def path_of(ns, view, ino: int) -> bytes | None:
    """One path of `ino` in `view` (b"/a/b"), or None if it has no name there that its
    recorded directory gives it."""
    try:
        attr = view.getattr(ino)
    except OSError:
        return None
    if attr.nlink == 0:
        return None
    where = dir_path(ns, view, attr.parent, {ROOT_INO: b""})
    name = names_in(ns, view, attr.parent, {ino}).get(ino) if where is not None else None
    return None if name is None else where + b"/" + name


def names_in(ns, view, parent: int, inos: set[int]) -> dict[int, bytes]:
    """A name directory `parent` gives each of `inos`, read until each has one."""
    names: dict[int, bytes] = {}
    for prefix, v in ns.entries.scan(U64.pack(parent), view.epoch):
        ino = U64.unpack(v)[0]
        if ino in inos and ino not in names:
            names[ino] = entry_name(prefix)
            if len(names) == len(inos):
                break
    return names


def dir_path(ns, view, d: int, known: dict[int, bytes | None]) -> bytes | None:
    """The path of directory d (b"" for the root), None if its parents do not lead to
    the root by names that exist. `known` maps directories to their paths (the root's
    included) and learns those found on the way."""
    chain = []
    while d not in known:
        if len(chain) > 4096:  # no such depth in a sound tree: a loop
            return None
        chain.append(d)
        try:
            d = view.getattr(d).parent
        except OSError:
            known[d] = None
    path = known[d]
    for child in reversed(chain):
        name = None if path is None else names_in(ns, view, d, {child}).get(child)
        path = known[child] = None if name is None else path + b"/" + name
        d = child
    return path
