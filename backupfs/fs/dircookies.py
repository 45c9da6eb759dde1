"""Readdir cookies that mean the same in every open of a directory, and after a restart.

A listing goes out in pieces, each entry with a cookie (its `d_off`) from which the next
piece resumes. The kernel's own readdir hands a cookie back on the same open directory,
but an NFS server does not: the kernel's nfsd and NFS-Ganesha open the directory afresh
for every READDIR and seek to the cookie the client sent back, and a client may send it
back after the daemon has restarted (an upgrade, a `systemctl restart`). So a cookie is
a function of the name alone: a 61-bit XXH3 of it, above the few small cookies that
virtual entries use. It means "resume after this name", which stays right while the
directory changes, since the names are listed in order.

A table per directory maps the cookies given out back to their names, so that a resume
costs a dictionary lookup. A cookie no table knows (the daemon restarted, or the table
was dropped) is looked for by hashing the directory's names from the start, once: they
fill the table on the way. A cookie whose name is gone and was in no table is refused.

Two names of one directory with the same hash (about one chance in five million for a
directory of a million names) must still get different cookies, or a listing could resume at the
wrong one again and again: the later name in order takes its next hash (another seed).
A scan from the start sees the names in name order, as listings do, so it gives the
same cookies, unless the colliding name was created behind a listing under way.

Tables are kept for the MAX_TABLES most recently opened directories, and up to
MAX_NAMES names in all; an open directory keeps its own table alive.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable

import xxhash

# Cookies below this are positions among a directory's virtual entries (the root's
# `snapshots`); 0 is the start of a listing.
FIRST_COOKIE = 1 << 10
# ~100 bytes a name with its dict entry: about 25 MiB for the default.
MAX_NAMES = 1 << 18
# A `find` or `rsync` opens every directory of a tree once.
MAX_TABLES = 4096


def name_cookie(name: bytes, seed: int = 0) -> int:
    """A name's cookie (the `seed`-th choice, for a name whose first is taken): at least
    FIRST_COOKIE and under 2**62, so any d_off or NFS cookie holds it."""
    return FIRST_COOKIE + (xxhash.xxh3_64_intdigest(name, seed) >> 3)


class CookieTable:
    """One directory's cookies, each the one `name_cookie` gives its name unless another
    name of the directory had it first."""

    __slots__ = ("_name_of", "_cookie_of", "counted_by")

    def __init__(self, counted_by: "DirCookies | None" = None) -> None:
        self._name_of: dict[int, bytes] = {}
        self._cookie_of: dict[bytes, int] = {}
        self.counted_by = counted_by   # the registry while it holds this table

    def __len__(self) -> int:
        return len(self._name_of)

    def cookie_after(self, name: bytes) -> int:
        """The cookie that resumes a listing after `name`."""
        cookie = self._cookie_of.get(name)
        if cookie is None:
            seed = 0
            cookie = name_cookie(name)
            while cookie in self._name_of:
                seed += 1
                cookie = name_cookie(name, seed)
            self._name_of[cookie] = name
            self._cookie_of[name] = cookie
            if self.counted_by is not None:
                self.counted_by.names_held += 1
        return cookie

    def name_before(self, cookie: int, names: Callable[[], Iterable[bytes]]) -> bytes | None:
        """The name to resume after (None: from the start). `names` lists the directory
        in order, for a cookie this table has not seen; KeyError if none has it."""
        if cookie == 0:
            return None
        name = self._name_of.get(cookie)
        if name is None and FIRST_COOKIE <= cookie < 1 << 62:
            for n in names():
                if self.cookie_after(n) == cookie:
                    return n
        if name is None:
            raise KeyError(cookie)
        return name


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
            self.names_held -= len(old)
        return t
