"""Readdir cookies that any open of a directory can resume from.

A listing goes out in pieces, each entry with a cookie (its `d_off`) from which the next
piece resumes. The kernel's own readdir hands a cookie back on the same open directory,
but an NFS server does not: the kernel's nfsd and NFS-Ganesha open the directory afresh
for every READDIR and seek to the cookie the client sent back. So cookies belong to the
directory, not to one open of it: cookie n means "resume after the n-th name this
daemon listed in the directory", whichever open listed it. Resuming after a name stays
right while the directory changes, since the names are listed in order.

Tables are kept for the MAX_TABLES most recently opened directories, and up to
MAX_NAMES names in all; an open directory keeps its own table alive. A cookie no table
knows (the daemon restarted, or the table was dropped) is refused rather than guessed at.
"""

from __future__ import annotations

from collections import OrderedDict

# ~100 bytes a name with its dict entry: about 25 MiB for the default.
MAX_NAMES = 1 << 18
# A `find` or `rsync` opens every directory of a tree once.
MAX_TABLES = 4096


class CookieTable:
    """One directory's cookies: cookie n resumes after `names[n - 1]`."""

    __slots__ = ("names", "_cookie_of", "counted_by")

    def __init__(self, counted_by: "DirCookies | None" = None) -> None:
        self.names: list[bytes] = []
        self._cookie_of: dict[bytes, int] = {}
        self.counted_by = counted_by   # the registry while it holds this table

    def cookie_after(self, name: bytes) -> int:
        cookie = self._cookie_of.get(name)
        if cookie is None:
            self.names.append(name)
            cookie = self._cookie_of[name] = len(self.names)
            if self.counted_by is not None:
                self.counted_by.names_held += 1
        return cookie

    def name_before(self, cookie: int) -> bytes | None:
        """The name to resume after (None: from the start); KeyError if unknown."""
        if cookie == 0:
            return None
        if not 0 < cookie <= len(self.names):
            raise KeyError(cookie)
        return self.names[cookie - 1]


class DirCookies:
    def __init__(self, max_names: int = MAX_NAMES, max_tables: int = MAX_TABLES):
        self.max_names = max_names
        self.max_tables = max_tables
        self.names_held = 0
        self._tables: OrderedDict[int, CookieTable] = OrderedDict()

    def table(self, kernel_ino: int) -> CookieTable:
        """The directory's table (made if need be), as most recently used."""
        t = self._tables.pop(kernel_ino, None)
        if t is None:
            t = CookieTable(self)
        self._tables[kernel_ino] = t
        while len(self._tables) > 1 and (len(self._tables) > self.max_tables
                                         or self.names_held > self.max_names):
            _, old = self._tables.popitem(last=False)
            old.counted_by = None
            self.names_held -= len(old.names)
        return t
