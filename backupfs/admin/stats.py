"""`stats`: where the space goes.

Per view (the live tree and each snapshot): logical bytes (file sizes) and referenced
bytes (the stored blocks its files use, like ZFS `referenced`). Per snapshot: unique
bytes, what deleting it would free (ZFS `used`), from the same deadlist walk deletion
does. For the store: stored bytes, compression and dedup ratios, dead bytes awaiting
compaction, and checksum errors seen by the last verify.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .progress import progress_bar
from .verify import LAST_NAME, walk_files


def view_usage(view, locations: dict) -> dict:
    """Files, logical and referenced bytes of a view, each file once however many hard
    links name it (as `du` counts; a hard link is not a copy)."""
    logical = referenced = files = 0
    seen: set[int] = set()
    for _, attr in walk_files(view):
        if attr.ino in seen:
            continue
        seen.add(attr.ino)
        files += 1
        logical += attr.size
        for _, h in view.block_range(attr.ino):
            loc = locations.get(h)
            if loc is not None:
                referenced += loc.raw_len
    return {"files": files, "logical_bytes": logical, "referenced_bytes": referenced}


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
    """The store's figures, and each view's unless `per_view` is false: that walks the
    live tree and every snapshot, with a progress bar (one step a view) on a terminal."""
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
    snapshots = ns.snapshots()
    with progress_bar("stats", total=1 + len(snapshots), unit="view",
                      enabled=show_progress) as bar:
        out["live"] = view_usage(ns.live, locations)
        bar.update()
        total_referenced = out["live"]["referenced_bytes"]
        for r in snapshots:
            usage = view_usage(ns.view(r.epoch), locations)
            total_referenced += usage["referenced_bytes"]
            out["snapshots"].append({"name": r.name, "label": r.label, "hold": r.hold,
                                     **usage, "unique_bytes": unique_bytes(ns, r, locations)})
            bar.update()
    out["dedup_ratio"] = round(total_referenced / raw, 3) if raw else None
    return out
