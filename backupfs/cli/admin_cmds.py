"""verify, fsck, stats, compact: trusting the store and understanding its space.

These read the store directly (read-only LMDB transactions beside a running daemon),
so the CPU work of a scrub never competes with the FUSE loop. On a mounted store the
daemon is first asked to commit what it holds, so they see the current state.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import click

from ..daemon.mountinfo import mounts_of_store
from ..daemon.protocol import ControlClient, NoDaemon
from ..errors import BackupfsError, StoreInUse
from . import main
from .target import resolve_store

TARGET = click.argument("target", metavar="MOUNTPOINT|STORE")
JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _daemon(store_path: Path) -> ControlClient | None:
    """The running daemon of a store, if it is mounted."""
    if not mounts_of_store(store_path):
        return None
    client = ControlClient(store_path)
    try:
        client.call("ping")
    except NoDaemon:
        return None
    return client


def current_store(target: str) -> Path:
    """The store of a target; if it is mounted, its daemon has committed everything."""
    path = resolve_store(target)
    daemon = _daemon(path)
    if daemon is not None:
        daemon.call("flush")
    return path


def _open(path: Path, readonly: bool = True):
    """(Store, Namespace) of a store. Imported here: the store layer pulls in trio and
    LMDB, which commands that only talk to the daemon should not pay for at startup."""
    from ..namespace import Namespace
    from ..store import Store

    store = Store.open(path, readonly=readonly)
    return store, Namespace(store)


@contextmanager
def reading(target: str):
    """(store, namespace) of a store, read-only, current as of now."""
    path = current_store(target)
    store, ns = _open(path)
    try:
        yield store, ns
    finally:
        store.close()


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- verify ------------------------------------------------------------------------------

@main.command("verify")
@TARGET
@click.option("--snapshot", metavar="NAME", help="Only the blocks of this snapshot.")
@click.option("--sample", type=click.FloatRange(0, 100, min_open=True), metavar="PERCENT",
              help="Only this share of the blocks (a fixed choice by hash, so repeated "
                   "sampled runs check the same blocks).")
@click.option("--max-duration", type=float, metavar="SECONDS",
              help="Stop after this long; the next run resumes where this one stopped.")
@click.option("--restart", is_flag=True, help="Start over instead of resuming.")
@JSON
def verify_cmd(target, snapshot, sample, max_duration, restart, as_json):
    """Read and re-hash every referenced block (a scrub); name every file and snapshot
    that uses a bad one. Exit status 1 when anything is bad, 2 when paused unfinished."""
    from ..admin.verify import verify

    state = verify(current_store(target), snapshot=snapshot, sample=sample,
                   max_duration=max_duration, restart=restart)
    if as_json:
        _echo_json({"finished": state.finished is not None, "checked": state.checked,
                    "bytes": state.bytes, "bad": state.bad})
    else:
        for b in state.bad_blocks:
            click.echo(f"BAD block {b.hash} (pack {b.pack_id}, offset {b.offset}): {b.reason}")
            for line in _uses_by_path(b.used_by) or ["(no file uses it)"]:
                click.echo(f"    {line}")
        done = "verified" if state.finished else "paused after"
        click.echo(f"{done} {state.checked} blocks ({human_size(state.bytes)}): "
                   f"{len(state.bad)} bad")
    if state.bad:
        raise SystemExit(1)
    if state.finished is None:
        raise SystemExit(2)


def _uses_by_path(used_by: list[str]) -> list[str]:
    """"where: path" uses as one line per path: a file unchanged for a year of daily
    snapshots is one line, not 366 (`--json` keeps every use)."""
    wheres: dict[str, list[str]] = {}
    for use in used_by:
        where, _, path = use.partition(": ")
        wheres.setdefault(path, []).append(where)
    lines = []
    for path, seen in wheres.items():
        snaps = [w.removeprefix("snapshot ") for w in seen if w != "live"]
        parts = ["live"] if "live" in seen else []
        if len(snaps) > 3:
            parts.append(f"{len(snaps)} snapshots, {snaps[0]} to {snaps[-1]}")
        elif snaps:
            parts.append(("snapshot " if len(snaps) == 1 else "snapshots ") + ", ".join(snaps))
        lines.append(f"{path}: {' and '.join(parts)}")
    return lines


# -- fsck --------------------------------------------------------------------------------

@main.command("fsck")
@click.argument("store", type=click.Path())
@click.option("--repair", is_flag=True, help="Fix what is safe to fix (the store must not "
              "be mounted).")
@JSON
def fsck_cmd(store, repair, as_json):
    """Cross-check the index: refcounts, block locations, versions and deadlists, link
    counts, dangling entries, orphans. Exit status 1 when problems remain."""
    from ..admin.fsck import Fsck

    path = resolve_store(store)
    try:
        s, ns = _open(path, readonly=not repair)
    except StoreInUse:
        raise BackupfsError(f"{store}: the store is mounted; unmount it to repair") from None
    try:
        checker = Fsck(s, ns)
        report = checker.run()
        if repair:
            checker.repair()
    finally:
        s.close(commit=repair)
    remaining = report.not_repaired if repair else report.problems
    if as_json:
        _echo_json({"checked": dict(report.checked),
                    "problems": [p.as_dict() for p in report.problems],
                    "repaired": [p.as_dict() for p in report.repaired],
                    "not_repaired": [p.as_dict() for p in report.not_repaired],
                    "notes": [p.as_dict() for p in report.notes]})
    else:
        for p in report.notes:
            click.echo(f"note     {p.kind}: {p.message}")
        for p in report.problems:
            mark = "fixed" if repair and p in report.repaired else "PROBLEM"
            click.echo(f"{mark:8} {p.kind}: {p.message}")
        if repair:
            for p in report.repaired:
                if p not in report.problems:
                    click.echo(f"fixed    {p.kind}: {p.message}")
        checked = ", ".join(f"{n} {what}" for what, n in report.checked.items())
        click.echo(f"checked {checked}: {len(report.problems)} problems"
                   + (f", {len(report.not_repaired)} not repairable" if repair else ""))
    if remaining:
        raise SystemExit(1)


# -- stats -------------------------------------------------------------------------------

@main.command("stats")
@TARGET
@click.option("--quick", is_flag=True, help="Store figures only: skip walking the trees.")
@JSON
def stats_cmd(target, quick, as_json):
    """Space: logical and referenced bytes of the live tree and each snapshot, what each
    snapshot alone keeps (what deleting it frees), compression, dedup, dead space."""
    from ..admin.stats import store_stats

    with reading(target) as (store, ns):
        st = store_stats(store, ns, per_view=not quick)
        daemon = _daemon(store.path)
    if daemon is not None:
        st["daemon"] = daemon.call("stats")
    if as_json:
        _echo_json(st)
        return
    click.echo(f"stored      {human_size(st['stored_bytes'])} in {st['blocks']} blocks "
               f"(raw {human_size(st['raw_bytes'])}, compression x{st['compression_ratio'] or 1})")
    if "dedup_ratio" in st:
        click.echo(f"dedup       x{st['dedup_ratio'] or 1} (bytes referenced by all views / unique)")
    click.echo(f"dead        {human_size(st['dead_bytes'])} (freed, returned by `backupfs compact`)")
    errors = st.get("daemon", {}).get("checksum_errors")
    if errors is not None:
        click.echo(f"checksum errors seen by the mount: {errors}")
    if "last_verify" in st:
        lv = st["last_verify"]
        click.echo(f"last verify {lv['checked']} blocks, {lv['bad_blocks']} bad")
    if "live" in st:
        click.echo(f"\n{'view':28} {'files':>8} {'logical':>11} {'referenced':>11} {'unique':>11}")
        lv = st["live"]
        click.echo(f"{'live':28} {lv['files']:>8} {human_size(lv['logical_bytes']):>11} "
                   f"{human_size(lv['referenced_bytes']):>11} {'':>11}")
        for s in st["snapshots"]:
            click.echo(f"{s['name']:28} {s['files']:>8} {human_size(s['logical_bytes']):>11} "
                       f"{human_size(s['referenced_bytes']):>11} {human_size(s['unique_bytes']):>11}")


# -- compact -----------------------------------------------------------------------------

@main.command("compact")
@TARGET
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Rewrite packs whose dead share is over this.")
@JSON
def compact_cmd(target, threshold, as_json):
    """Rewrite packs that are mostly dead space, returning it to the disk. Online on a
    mounted store (the daemon does it between requests); crash-safe at every step."""
    from dataclasses import asdict

    from ..admin.progress import progress_bar

    path = resolve_store(target)
    daemon = _daemon(path)
    if daemon is not None:
        result = daemon.call("compact", threshold=threshold)
    else:
        from ..store import Store

        with Store.open(path) as store, \
                progress_bar("compact", unit="pack") as bar:
            def progress(done, total):
                bar.total = total
                bar.update(done - bar.n)
            result = asdict(store.blocks.compact(threshold, progress=progress))
            result["corrupt"] = [str(e) for e in result.get("corrupt") or []]
    if as_json:
        _echo_json(result)
    else:
        click.echo(f"rewrote {result['packs_rewritten']} packs, freed "
                   f"{human_size(result['bytes_freed'])} ({result['blocks_moved']} blocks moved, "
                   f"{result['blocks_dropped']} dead blocks dropped)")
        for c in result.get("corrupt") or []:
            click.echo(f"left in place, corrupt: {c}")


# -- diff --------------------------------------------------------------------------------

@main.command("diff")
@TARGET
@click.argument("old")
@click.argument("new", required=False)
@JSON
def diff_cmd(target, old, new, as_json):
    """What changed from snapshot OLD to snapshot NEW (default: the live tree):
    + added, - removed, M modified, R renamed (as `zfs diff`)."""
    from ..admin.diff import diff

    with reading(target) as (store, ns):
        a = ns.find_snapshot(old)
        b = ns.find_snapshot(new) if new else None
        if b is not None and b.epoch < a.epoch:
            a, b = b, a
        changes = diff(ns, a.epoch, b.epoch if b else None)
    if as_json:
        _echo_json([{"kind": c.kind, "path": c.path.decode(errors="surrogateescape"),
                     "new_path": c.new_path.decode(errors="surrogateescape") or None,
                     "dir": c.is_dir} for c in changes])
        return
    for c in changes:
        click.echo(str(c))
