"""`VersionedTable`: one LMDB database of epoch-versioned records, and the deadlist.

Reading at epoch s sees, for each key, the newest version born at or before s; a
tombstone or no version at all means absent. Writing in epoch K follows the rule that
makes snapshots O(1) (see docs/architecture.md):

- if no remaining snapshot can see the newest version (none was taken since it was
  born), it is overwritten where it is and whatever it referenced is released at once;
- otherwise it stays for the snapshots, the new version is written at K and the old one
  goes on the deadlist of K, from where deleting the last snapshot that sees it frees it.

A tombstone is kept only while an older version exists that it must hide, so deleting a
file leaves nothing behind once no snapshot needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple

from .records import TOMBSTONE, split_version_key, version_key

if TYPE_CHECKING:
    from .namespace import Namespace



def after_all_versions(prefix: bytes) -> bytes:
    """A key sorting after every version of `prefix` and before the next prefix."""
    return prefix + b"\xff" * 8 + b"\0"


# Keys whose live value is kept in memory, per table (cleared when full: the daemon
# touches a working set of recent inodes, far smaller than this).
LIVE_CACHE_MAX = 1 << 16


class Newest(NamedTuple):
    """A key's newest version, all that reads at the live epoch and writes look at."""

    born: int
    value: bytes          # empty: a tombstone
    has_older: bool       # whether older versions follow it


class VersionedTable:
    def __init__(self, ns: "Namespace", name: str, table_id: int,
                 release: Callable[[bytes], None] | None = None):
        self.ns = ns
        self.name = name
        self.table_id = table_id
        self.db = ns.store.open_db(name)
        self._release = release
        # prefix -> its newest version (None: it has none). The daemon's LMDB work is
        # mostly at the live epoch, where the newest version is the one seen: creating a
        # small file reads its inode about ten times and rewrites it four. Every change
        # to a key goes through this class, which keeps its entry right; a snapshot
        # changes no version, so the cache outlives it. (It assumes the write
        # transaction is never rolled back under it: the store aborts one only when it
        # closes.)
        self._recent: dict[bytes, Newest | None] = {}

    def _cursor(self):
        return self.ns.store.txn.cursor(db=self.db)

    # -- reading ---------------------------------------------------------------------

    def read(self, prefix: bytes, epoch: int) -> bytes | None:
        """The value visible at `epoch`, or None if absent there."""
        if epoch == self.ns.epoch:
            newest = self.newest(prefix)
            return (newest.value or None) if newest else None
        c = self._cursor()
        if not c.set_range(version_key(prefix, epoch)) or not self._is_version_of(c.key(), prefix):
            return None
        return c.value() or None

    def newest(self, prefix: bytes) -> Newest | None:
        """The key's newest version, or None if it has none."""
        try:
            return self._recent[prefix]
        except KeyError:
            pass
        found = None
        c = self._cursor()
        if c.set_range(prefix) and self._is_version_of(c.key(), prefix):
            born, value = split_version_key(c.key())[1], c.value()
            found = Newest(born, value, c.next() and self._is_version_of(c.key(), prefix))
        self._remember(prefix, found)
        return found

    @staticmethod
    def _is_version_of(key: bytes, prefix: bytes) -> bool:
        return len(key) == len(prefix) + 8 and key.startswith(prefix)

    def _remember(self, prefix: bytes, newest: Newest | None) -> None:
        if len(self._recent) >= LIVE_CACHE_MAX:
            self._recent.clear()
        self._recent[prefix] = newest

    def versions(self, prefix: bytes) -> list[tuple[int, bytes]]:
        """Every version of a key, newest first: (birth epoch, value)."""
        out = []
        c = self._cursor()
        if c.set_range(prefix):
            for k, v in c:
                if not self._is_version_of(k, prefix):
                    break
                out.append((split_version_key(k)[1], v))
        return out

    def scan(self, group: bytes, epoch: int, start: bytes | None = None
             ) -> Iterator[tuple[bytes, bytes]]:
        """(prefix, value) of the keys beginning with `group` that are present at `epoch`,
        in key order, from `start` (a key or prefix) on.

        The cursor is positioned afresh for every item, so the caller may change the
        table between items (readdir while `rm -rf` unlinks) without losing its place.
        It is one cursor while the transaction lasts (LMDB keeps a write transaction's
        cursors right through its changes, and finds a key near the cursor's page
        first): a new cursor per item cost a quarter of a listing's time.
        """
        seek = group if start is None else start
        txn = c = None
        while True:
            if self.ns.store.txn is not txn:  # a commit between items ends the cursor
                txn = self.ns.store.txn
                c = txn.cursor(db=self.db)
            item = self._first_present(c, group, epoch, seek)
            if item is None:
                return
            yield item
            seek = after_all_versions(item[0])

    def _first_present(self, c, group: bytes, epoch: int, seek: bytes):
        if not c.set_range(seek):
            return None
        k = c.key()
        while k.startswith(group):
            prefix, born = split_version_key(k)
            if born <= epoch:
                v = c.value()
                if v:
                    return prefix, v
                if not c.set_range(after_all_versions(prefix)):  # hidden by a tombstone
                    return None
            elif not c.next():
                return None
            k = c.key()
        return None

    # -- writing ---------------------------------------------------------------------

    def write(self, prefix: bytes, value: bytes | None, epoch: int | None = None) -> None:
        """Make `value` (None: absent) the key's value from `epoch` (default: live) on."""
        newest = self.newest(prefix)
        # Forgotten first, so that a write that fails half-way leaves no stale entry.
        del self._recent[prefix]
        after = self._write(prefix, value, epoch, newest)
        if epoch is None:
            self._remember(prefix, after)

    def _write(self, prefix: bytes, value: bytes | None, epoch: int | None,
               newest: Newest | None) -> Newest | None:
        """The write itself, given the key's newest version; returns it as it is after."""
        ns = self.ns
        at = ns.epoch if epoch is None else epoch
        txn = ns.store.txn
        new_value = TOMBSTONE if value is None else value
        if newest is None:
            if value is None:
                return None
            txn.put(version_key(prefix, at), new_value, db=self.db)
            ns.births.add(at, self, prefix)
            return Newest(at, new_value, False)
        born, old, has_older = newest
        if born == at or not ns.seen_by_snapshot(born, at):
            self._release_value(old)
            if value is None and not has_older:
                txn.delete(version_key(prefix, born), db=self.db)
                ns.births.remove(born, self, prefix)
                return None
            txn.put(version_key(prefix, born), new_value, db=self.db)
            return Newest(born, new_value, has_older)
        if value is None and not old:
            return newest  # already absent
        txn.put(version_key(prefix, at), new_value, db=self.db)
        ns.births.add(at, self, prefix)
        ns.deadlist.add(at, self, prefix, born)
        return Newest(at, new_value, True)

    def _release_value(self, value: bytes) -> None:
        if value and self._release is not None:
            self._release(value)

    def free_version(self, prefix: bytes, born: int) -> None:
        """Remove a version no view can see any more, with its deadlist entry.

        Keeps the deadlist invariant: a version that is not the newest has one entry,
        keyed by the birth epoch of the next newer version (its killer).
        """
        self._recent.pop(prefix, None)
        versions = self.versions(prefix)
        i = next((i for i, (b, _) in enumerate(versions) if b == born), None)
        if i is None:
            return
        txn = self.ns.store.txn
        deadlist = self.ns.deadlist
        self._release_value(versions[i][1])
        txn.delete(version_key(prefix, born), db=self.db)
        self.ns.births.remove(born, self, prefix)
        if i > 0:
            killer = versions[i - 1][0]
            deadlist.remove(killer, self, prefix)
            if i + 1 < len(versions):  # the older neighbour is now killed by our killer
                deadlist.move(born, killer, self, prefix)
        elif i + 1 < len(versions):
            deadlist.remove(born, self, prefix)  # the older neighbour is now the newest
        del versions[i]
        self._drop_needless_tombstones(prefix, versions)

    def _drop_needless_tombstones(self, prefix: bytes, versions: list[tuple[int, bytes]]) -> None:
        """Tombstones with no older version hide nothing: remove them, oldest first (with
        the deadlist entry of each, killed by the next newer version). There can be two
        in a row: a name removed, created again after a snapshot and removed again."""
        while versions and not versions[-1][1]:
            oldest_born = versions.pop()[0]
            self.ns.store.txn.delete(version_key(prefix, oldest_born), db=self.db)
            self.ns.births.remove(oldest_born, self, prefix)
            if versions:
                self.ns.deadlist.remove(versions[-1][0], self, prefix)
