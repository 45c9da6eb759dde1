"""The snapshot catalog: which snapshots exist, their names, labels, epochs and holds."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

from ..errors import BackupfsError
from .records import U64

NAME_FORMAT = "%Y-%m-%dT%H%M%SZ"


class SnapshotNotFound(BackupfsError):
    pass


class SnapshotHeld(BackupfsError):
    pass


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    id: int
    name: str        # YYYY-MM-DDTHHMMSSZ in UTC, with -2, -3 ... for a second in the same second
    label: str | None
    created_ns: int
    epoch: int       # the epoch it froze: it sees every version born at or before it
    hold: bool = False
    # Deleted, gone for users, its versions not all freed yet: files in it are open (freed
    # once closed), or the freeing is under way (it commits in pieces); after a crash,
    # the next mount finishes it.
    deleting: bool = False


def base_name(created_ns: int) -> str:
    return datetime.fromtimestamp(created_ns // 10**9, timezone.utc).strftime(NAME_FORMAT)


def unique_name(created_ns: int, taken: set[str], last_given: str | None = None) -> str:
    """The second's name, or with -2, -3 ... where it is taken; never one at or before
    `last_given` in that second either, so that a deleted snapshot's name is not given to
    another (a Samba client's @GMT token or a cached path would find other contents)."""
    name = base = base_name(created_ns)
    n = 1
    if last_given == base:
        n = 2
    elif last_given is not None and last_given.startswith(base + "-"):
        n = int(last_given[len(base) + 1:]) + 1
    if n > 1:
        name = f"{base}-{n}"
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


class Catalog:
    """The `snapshots` database (id -> JSON record), mirrored in memory, oldest first."""

    def __init__(self, store):
        self.store = store
        self.db = store.open_db("snapshots")
        self.records: list[SnapshotRecord] = [
            SnapshotRecord(id=U64.unpack(k)[0], **json.loads(v))
            for k, v in store.txn.cursor(db=self.db)
        ]

    def _save(self, r: SnapshotRecord) -> None:
        value = {k: v for k, v in asdict(r).items() if k != "id"}
        self.store.txn.put(U64.pack(r.id), json.dumps(value).encode(), db=self.db)

    def add(self, snap_id: int, epoch: int, label: str | None, hold: bool,
            now_ns: int | None = None, last_given: str | None = None,
            name: str | None = None) -> SnapshotRecord:
        """A new snapshot, named for its creation time unless `name` (a replica's copy
        of another store's snapshot keeps that snapshot's name)."""
        created = time.time_ns() if now_ns is None else now_ns
        taken = {r.name for r in self.records}
        if name is None:
            name = unique_name(created, taken, last_given)
        elif name in taken:
            raise ValueError(f"a snapshot named {name} exists")
        r = SnapshotRecord(snap_id, name, label, created, epoch, hold)
        self._save(r)
        self.records.append(r)
        return r

    def remove(self, snap_id: int) -> None:
        self.store.txn.delete(U64.pack(snap_id), db=self.db)
        self.records = [r for r in self.records if r.id != snap_id]

    def set_hold(self, snap_id: int, hold: bool) -> SnapshotRecord:
        return self._update(replace(self.get(snap_id), hold=hold))

    def set_deleting(self, snap_id: int) -> SnapshotRecord:
        return self._update(replace(self.get(snap_id), deleting=True))

    def _update(self, r: SnapshotRecord) -> SnapshotRecord:
        self._save(r)
        self.records = [r if x.id == r.id else x for x in self.records]
        return r

    def get(self, snap_id: int) -> SnapshotRecord:
        for r in self.records:
            if r.id == snap_id:
                return r
        raise SnapshotNotFound(f"no snapshot with id {snap_id}")

    def find(self, name_or_id: str | int) -> SnapshotRecord:
        for r in self.records:
            if r.deleting:
                continue
            if r.name == name_or_id or str(r.id) == str(name_or_id):
                return r
        raise SnapshotNotFound(f"no snapshot named {name_or_id!r}")

    def epochs(self) -> list[int]:
        return [r.epoch for r in self.records]
