"""Consistency of the versioned tables with the snapshot catalog and the deadlist.

`check_versions` walks every versioned table once and reports each way the rules of
versions.py can be broken: a version no view can see (leaked), a tombstone that hides
nothing, a deadlist entry missing, extra or keyed by the wrong killer. It also counts the
block references the block map holds, for the refcount check. Used by `backupfs fsck`
and by the tests after every step.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from .records import MAX_EPOCH, split_version_key


@dataclass(frozen=True)
class VersionIssue:
    kind: str      # leaked-version, needless-tombstone, deadlist-/births- missing/extra
    table: str
    prefix: bytes
    born: int
    killer: int | None = None

    def __str__(self) -> str:
        where = f"{self.table} key {self.prefix.hex()} born in epoch {self.born}"
        return {"leaked-version": f"{where}: visible to no snapshot and not live",
                "needless-tombstone": f"{where}: tombstone with nothing to hide",
                "deadlist-missing": f"{where}: no deadlist entry for its killer {self.killer}",
                "deadlist-extra": f"deadlist entry {self.killer}/{where}: no such killed version",
                "births-missing": f"{where}: missing from the births index",
                "births-extra": f"births entry for {where}: no such version",
                }[self.kind]


@dataclass
class VersionReport:
    issues: list[VersionIssue] = field(default_factory=list)
    block_refs: dict[bytes, int] = field(default_factory=dict)
    versions: int = 0


def check_versions(ns, progress=None) -> VersionReport:
    epochs = sorted(ns.snapshot_epochs() + [ns.epoch])
    txn = ns.store.txn
    report = VersionReport()
    expected_dead: dict[tuple[int, int, bytes], int] = {}
    stored: set[tuple[int, bytes, int]] = set()   # (table id, prefix, birth) of every version

    def visible(born: int, killer: int | None) -> bool:
        i = bisect.bisect_left(epochs, born)
        return i < len(epochs) and (killer is None or epochs[i] < killer)

    def finish(table, prefix: bytes, versions: list[tuple[int, bytes]]) -> None:
        for i, (born, value) in enumerate(versions):
            killer = versions[i - 1][0] if i else None
            if killer is not None:
                expected_dead[(killer, table.table_id, prefix)] = born
            if not value and i + 1 == len(versions):
                report.issues.append(VersionIssue("needless-tombstone", table.name, prefix, born))
            elif not visible(born, killer):
                report.issues.append(VersionIssue("leaked-version", table.name, prefix, born))
            if value and table is ns.blockmap:
                report.block_refs[value] = report.block_refs.get(value, 0) + 1

    for table in ns.tables.values():
        prefix, versions = None, []
        for k, v in txn.cursor(db=table.db):
            p, born = split_version_key(k)
            if p != prefix:
                if prefix is not None:
                    finish(table, prefix, versions)
                prefix, versions = p, []
            versions.append((born, v))
            stored.add((table.table_id, p, born))
            report.versions += 1
            if progress and report.versions % 10000 == 0:
                progress(10000)
        if prefix is not None:
            finish(table, prefix, versions)

    names = {t.table_id: t.name for t in ns.tables.values()}
    for killer, table_id, prefix, born in ns.deadlist.killed_in(0, MAX_EPOCH):
        want = expected_dead.pop((killer, table_id, prefix), None)
        if want != born:
            report.issues.append(VersionIssue("deadlist-extra", names.get(table_id, "?"),
                                              prefix, born, killer))
    for (killer, table_id, prefix), born in expected_dead.items():
        report.issues.append(VersionIssue("deadlist-missing", names[table_id], prefix, born,
                                          killer))
    for born, table_id, prefix, _ in ns.births.walk(0, MAX_EPOCH):
        if (table_id, prefix, born) not in stored:
            report.issues.append(VersionIssue("births-extra", names.get(table_id, "?"),
                                              prefix, born))
        else:
            stored.discard((table_id, prefix, born))
    for table_id, prefix, born in stored:
        report.issues.append(VersionIssue("births-missing", names[table_id], prefix, born))
    return report
