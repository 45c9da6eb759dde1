"""`stats`: where the space goes.

Per view (the live tree and each snapshot): logical bytes (file sizes) and referenced
bytes (the stored blocks its files use, like ZFS `referenced`). Per snapshot: unique
bytes, what deleting it would free (ZFS `used`), from the same deadlist walk deletion
does. For the store: stored bytes, compression and dedup ratios, dead bytes awaiting
compaction, and checksum errors seen by the last verify.
"""

from __future__ import annotations

import json
import stat
from collections import Counter
from pathlib import Path

from ..namespace.records import U64
from .progress import progress_bar
from .verify import LAST_NAME



def file_usage(view, ino: int, locations: dict) -> tuple[int, int] | None:
    """(size, referenced bytes) of a regular file with a name in the view, else None."""
    try:
        attr = view.getattr(ino)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(attr.mode) or attr.nlink == 0:
        return None
    referenced = 0
    for _, h in view.block_range(ino):
        loc = locations.get(h)
        if loc is not None:
            referenced += loc.raw_len
    return attr.size, referenced


def changed_files(ns, first: int, last: int) -> set[int]:
    """The inodes whose record or block map has a version born in the epochs first..last:
    the only files whose usage can differ between the views at first - 1 and at last. A
    version stops being seen only where the next one of its key is born, a value or a
    tombstone (versions.py), so the births alone say what changed. Read in pieces
    (`walk`), so that the first view's walk (everything is born before it) does not hold every
    version in memory at once."""
    tables = (ns.inodes.table_id, ns.blockmap.table_id)
    return {U64.unpack_from(prefix)[0] for _, table_id, prefix, _ in ns.births.walk(first, last)
            if table_id in tables}


def usage_by_view(ns, epochs: list[int], locations: dict, step=lambda: None) -> dict[int, dict]:
    """Files, logical and referenced bytes of the view at each of `epochs` (ascending),
    each file once however many hard links name it (as `du` counts). Each view is the one
    before it plus what changed between them (`changed_files`), so the cost is the
    first view's size and then what changed, not the views' sizes: stats on a million
    files and a year of snapshots would walk 365 million files otherwise."""
    per_file: dict[int, tuple[int, int]] = {}  # ino -> (size, referenced)
    logical = referenced = 0
    out: dict[int, dict] = {}
    before = 0
    for epoch in epochs:
        view = ns.view(epoch)
        for ino in changed_files(ns, before + 1, epoch):
            old = per_file.pop(ino, None)
            if old is not None:
                logical, referenced = logical - old[0], referenced - old[1]
            new = file_usage(view, ino, locations)
            if new is not None:
                per_file[ino] = new
                logical, referenced = logical + new[0], referenced + new[1]
        out[epoch] = {"files": len(per_file), "logical_bytes": logical,
                      "referenced_bytes": referenced}
        before = epoch
        step()
    return out


def unique_bytes(ns, record, locations: dict) -> int:
    """Stored bytes only this snapshot keeps alive: what deleting it would free."""
    epochs = ns.snapshot_epochs()
    i = epochs.index(record.epoch)
    prev_epoch = epochs[i - 1] if i else 0
    next_epoch = epochs[i + 1] if i + 1 < len(epochs) else ns.epoch
    only_here: Counter = Counter()
    for _, table_id, prefix, born in ns.deadlist.killed_in(record.epoch + 1, next_epoch):
        if table_id == ns.blockmap.table_id and born > prev_epoch:
            h = ns.blockmap.read(prefix, born)
            if h is not None:
                only_here[h] += 1
    return sum(locations[h].record_len for h, n in only_here.items()
               if h in locations and locations[h].refcount == n)


def store_stats(store, ns, per_view: bool = True, show_progress: bool | None = None) -> dict:
    """The store's figures, and each view's unless `per_view` is false (`usage_by_view`:
    the oldest view in full, then what changed), with a progress bar (one step a view)
    on a terminal."""
    locations = {loc.hash: loc for loc in store.blocks.iter_locations()}
    live_blocks = [loc for loc in locations.values() if loc.refcount]
    raw = sum(loc.raw_len for loc in live_blocks)
    stored = sum(loc.record_len for loc in live_blocks)
    out = {
        "block_size": store.config.block_size,
        "blocks": len(live_blocks),
        "raw_bytes": raw,
        "stored_bytes": stored,
        "compression_ratio": round(raw / stored, 3) if stored else None,
        "dead_bytes": store.blocks.dead_bytes(),
        "pack_bytes": sum(store.pack_info(p)[0] for p in store.committed_pack_lengths()),
        "snapshots": [],
    }
    last = Path(store.path) / LAST_NAME
    if last.exists():
        v = json.loads(last.read_text())
        out["last_verify"] = {"finished": v.get("finished"), "checked": v.get("checked"),
                              "bad_blocks": len(v.get("bad", []))}
    if not per_view:
        return out
    # Every epoch that still holds versions is a step, those of snapshots being deleted
    # too: what changed between two views is only on record between adjacent epochs.
    epochs = sorted(set(ns.snapshot_epochs())) + [ns.epoch]
    with progress_bar("stats", total=len(epochs), unit="view", enabled=show_progress) as bar:
        usage = usage_by_view(ns, epochs, locations, bar.update)
    out["live"] = usage[ns.epoch]
    total_referenced = out["live"]["referenced_bytes"]
    for r in ns.snapshots():
        total_referenced += usage[r.epoch]["referenced_bytes"]
        out["snapshots"].append({"name": r.name, "label": r.label, "hold": r.hold,
                                 **usage[r.epoch],
                                 "unique_bytes": unique_bytes(ns, r, locations)})
    out["dedup_ratio"] = round(total_referenced / raw, 3) if raw else None
    return out
