"""Indexes of versions by epoch: the deadlist (versions killed in an epoch) and the
births (versions born in an epoch). Keys are (epoch, table id, prefix), so a range of
epochs is one cursor walk: what deleting a snapshot must look at, and what changed
between two snapshots (`diff`), cost what changed, not the size of the tree.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Iterator

from .records import U64

if TYPE_CHECKING:
    from .namespace import Namespace
    from .versions import VersionedTable

_HEAD = struct.Struct(">QB")
WALK_PIECE = 10_000  # entries read at a time by `walk`


class EpochIndex:
    def __init__(self, ns: "Namespace", name: str):
        self.ns = ns
        self.db = ns.store.open_db(name)

    @classmethod
    def _key(cls, epoch: int, table: "VersionedTable", prefix: bytes) -> bytes:
        return cls.key_of(epoch, table.table_id, prefix)

    def _put(self, epoch: int, table, prefix: bytes, value: bytes) -> None:
        self.ns.store.txn.put(self._key(epoch, table, prefix), value, db=self.db)

    def remove(self, epoch: int, table: "VersionedTable", prefix: bytes) -> None:
        self.ns.store.txn.delete(self._key(epoch, table, prefix), db=self.db)

    def _get(self, epoch: int, table, prefix: bytes) -> bytes | None:
        return self.ns.store.txn.get(self._key(epoch, table, prefix), db=self.db)

    def between(self, first: int, last: int, after: bytes | None = None,
                limit: int | None = None) -> list[tuple[int, int, bytes, bytes]]:
        """(epoch, table id, prefix, value) of the entries of epochs first..last, in key
        order: all of them, or the next `limit` of those whose key sorts after `after`
        (`key_of` an entry returned before), to walk a long range a piece at a time."""
        out: list[tuple[int, int, bytes, bytes]] = []
        c = self.ns.store.txn.cursor(db=self.db)
        start = _HEAD.pack(first, 0) if after is None else after + b"\0"
        if not c.set_range(start):
            return out
        for k, v in c:
            epoch, table_id = _HEAD.unpack_from(k)
            if epoch > last or len(out) == limit:
                break
            out.append((epoch, table_id, bytes(k[_HEAD.size:]), v))
        return out

    def walk(self, first: int, last: int, piece: int = WALK_PIECE
             ) -> Iterator[tuple[int, int, bytes, bytes]]:
        """`between(first, last)` read `piece` entries at a time, so that a walk of a
        long range (the oldest view's, where everything was born) never holds it all."""
        after = None
        while True:
            got = self.between(first, last, after, limit=piece)
            yield from got
            if len(got) < piece:
                return
            after = self.key_of(*got[-1][:3])

    @staticmethod
    def key_of(epoch: int, table_id: int, prefix: bytes) -> bytes:
        return _HEAD.pack(epoch, table_id) + prefix

    def __len__(self) -> int:
        return self.ns.store.txn.stat(self.db)["entries"]


class Deadlist(EpochIndex):
    """Versions killed in an epoch that some snapshot still sees:
    (killer epoch, table, prefix) -> birth epoch of the killed version."""

    def __init__(self, ns: "Namespace"):
        super().__init__(ns, "deadlist")

    def add(self, killer: int, table, prefix: bytes, born: int) -> None:
        self._put(killer, table, prefix, U64.pack(born))

    def get(self, killer: int, table, prefix: bytes) -> int | None:
        v = self._get(killer, table, prefix)
        return None if v is None else U64.unpack(v)[0]

    def move(self, old_killer: int, new_killer: int, table, prefix: bytes) -> None:
        born = self.get(old_killer, table, prefix)
        if born is not None:
            self.remove(old_killer, table, prefix)
            self.add(new_killer, table, prefix, born)

    def killed_in(self, first: int, last: int, after: bytes | None = None,
                  limit: int | None = None) -> list[tuple[int, int, bytes, int]]:
        """(killer, table id, prefix, birth) of everything killed in epochs first..last
        (or a piece of it: see `between`)."""
        return [(e, t, p, U64.unpack(v)[0])
                for e, t, p, v in self.between(first, last, after, limit)]


class Births(EpochIndex):
    """Every stored version by the epoch it was born in: (epoch, table, prefix) -> b""."""

    def __init__(self, ns: "Namespace"):
        super().__init__(ns, "births")

    def add(self, born: int, table, prefix: bytes) -> None:
        self._put(born, table, prefix, b"")
