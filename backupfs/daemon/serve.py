"""Running a mount: open the store, mount with pyfuse3, serve until unmounted or
signalled, then seal everything, commit and close.

The periodic transaction group (every `txg_interval` seconds) seals partial blocks and
commits, so at most that much un-fsynced work is lost in a crash; an fsync() from a
client commits at once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
from dataclasses import asdict
from pathlib import Path

import pyfuse3
import trio

from .. import libc
from ..errors import BackupfsError, CorruptBlock
from ..fs import BackupFS
from ..fs.pieces import PIECE, between_pieces
from ..namespace import Namespace, SnapshotHeld
from ..snapshots.retention import KeepPolicy, decide
from ..snapshots.schedule import Schedule
from ..store import Store
from ..store.compaction import CompactResult, PackCompaction
from ..store.decode_pool import decoder_count
from .control import ControlServer, control_group, share_store, snapshot_dict
from .protocol import SOCKET_NAME
from .mountinfo import SOURCE_PREFIX, backupfs_mounts, find_mount, set_read_ahead_once_serving

log = logging.getLogger("backupfs.daemon")

DEFAULT_TXG_INTERVAL = 5.0
MAX_UNIX_PATH = 108  # sun_path, with its terminating NUL
GC_BUDGET = 20000
# Four of the largest READs one request carries (256 pages) per window: two for the
# decoder processes and more queued behind them, so neither core waits for the kernel to
# send the next (cold reads in 128 MiB segments, interleaved: 1.06x and 1.13x of 2 MiB,
# faster in 34 of 40 segments; 8 MiB 0.95x; 2 MiB was 505-587 MB/s against 382-523 at
# 1 MiB, and without decoders 2 MiB read as 1 MiB did). docs/performance.md.
READ_AHEAD_KB = 4096
ALLOWED_OPTIONS = {"allow_other", "allow_root", "default_permissions", "noatime", "ro", "rw",
                   "nodev", "nosuid", "dev", "suid", "exec", "noexec", "atime"}


def fuse_options(store_path: Path, extra: list[str]) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {f"fsname={SOURCE_PREFIX}{store_path}", "subtype=backupfs"}
    for o in extra:
        name = o.split("=", 1)[0]
        if name not in ALLOWED_OPTIONS:
            raise BackupfsError(f"unsupported mount option {o!r} "
                                f"(known: {', '.join(sorted(ALLOWED_OPTIONS))})")
        if name != "rw":
            opts.add(o)
    return opts


_libc_syncfs = libc.function("syncfs", [ctypes.c_int])


def _syncfs(path: Path) -> None:
    """Have the kernel write back what it caches for the mount at `path`.

    Raises OSError if writing back failed, here or earlier unseen: syncfs reports each
    writeback error of a filesystem once, to the first syncfs after it."""
    if _libc_syncfs is None:
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc_syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def _keep_finishing_on_signals() -> None:
    """Once unmounted, what is left is writing back: a signal must not cut it short.
    (systemd stops a fstab mount by unmounting it, then SIGTERMs what is left of the unit:
    this daemon, which would die before committing what the kernel just wrote back.)"""
    def note(signum, frame):
        log.info("%s: not serving; finishing writes first", signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, note)


class Daemon:
    def __init__(self, store_path: str | os.PathLike, mountpoint: str | os.PathLike,
                 options: list[str] | None = None, txg_interval: float = DEFAULT_TXG_INTERVAL,
                 writeback_cache: bool = False, control_group: str | None = None):
        self.store_path = Path(os.path.realpath(store_path))
        self.control_group = control_group
        self.mountpoint = Path(os.path.realpath(mountpoint))
        self.options = fuse_options(self.store_path, options or [])
        self.txg_interval = txg_interval
        self.writeback_cache = writeback_cache
        self.ops: BackupFS | None = None
        # A second compaction would find packs the first has removed since it listed them.
        self._one_compaction = trio.Lock()

    def run(self) -> None:
        """Mount and serve until unmounted; raises BackupfsError for what the user can fix."""
        if not self.mountpoint.is_dir():
            raise BackupfsError(f"{self.mountpoint}: mountpoint is not a directory")
        sock = os.fsencode(self.store_path / SOCKET_NAME)
        if len(sock) >= MAX_UNIX_PATH:
            raise BackupfsError(f"{self.store_path}: path too long for the control socket "
                                f"({len(sock)} bytes, the limit is {MAX_UNIX_PATH - 1})")
        if find_mount(self.mountpoint):
            raise BackupfsError(f"{self.mountpoint}: a backupfs store is already mounted there")
        store = Store.open(self.store_path)
        try:
            # A bad [schedule] must stop the mount before it happens, not after.
            self.schedule = Schedule.from_config(store.config.extra)
            self.control_gid = control_group(self.control_group, store.config.extra)
            share_store(self.store_path, self.control_gid)
            ns = Namespace(store)
            store.commit()
            store.blocks.use_decoders(decoder_count(store.config.extra))
            self.ops = BackupFS(store, ns, writeback_cache=self.writeback_cache)
            try:
                pyfuse3.init(self.ops, str(self.mountpoint), self.options)
            except RuntimeError as e:
                raise BackupfsError(f"{self.mountpoint}: cannot mount: {e}") from None
            log.info("mounted %s at %s", self.store_path, self.mountpoint)
            try:
                trio.run(self._serve)
            finally:
                # Not find_mount(): its realpath() would stat the mountpoint, and a mount
                # whose loop never ran never answers (the daemon would hang in D state).
                still_mounted = any(m.mountpoint == self.mountpoint
                                    for m in backupfs_mounts())
                pyfuse3.close(unmount=still_mounted)
        finally:
            store.blocks.stop_decoders()
            store.close(commit=True)
            log.info("store %s closed", self.store_path)

    async def _raise_read_ahead(self) -> None:
        """Let the kernel read ahead READ_AHEAD_KB, not its default 128 KiB: a sequential
        read then comes as 1 MiB requests, four at once, a round trip per eight blocks
        instead of per block (what a cold `cp` out of a snapshot is bound by). Only root
        may; without it, reads work as before."""
        try:
            await set_read_ahead_once_serving(self.mountpoint, READ_AHEAD_KB)
        except OSError as e:
            log.info("read-ahead left at the kernel's default: %s", e)

    async def _serve(self) -> None:
        ops = self.ops
        # Inodes unlinked while open when the last daemon stopped: nothing holds them now.
        for ino in ops.ns.orphans():
            ops.ns.reclaim(ino)
        schedule = self.schedule
        # Under the receiver of _signals while it runs, and what it restores (and hands a
        # signal still pending to) when it stops.
        _keep_finishing_on_signals()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._txg_timer)
            nursery.start_soon(self._signals)
            await nursery.start(ControlServer(
                self, self.store_path, mode=0o600 if self.control_gid is None else 0o660,
                group=self.control_gid).serve)
            if schedule.enabled:
                nursery.start_soon(self._scheduler, schedule)
            nursery.start_soon(self._raise_read_ahead)
            nursery.start_soon(ops.data.run_sealers)
            # Snapshots deleted while open, or whose deletion a crash cut short.
            nursery.start_soon(ops.finish_deletes)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
        await ops.finish_deletes(unmounted=True)
        unstored = None
        try:
            await ops.flush_everything()
        except OSError as e:
            dirty = sum(1 for b in ops.data.buffers.values() if b.dirty)
            unstored = f"buffered data of {dirty} files could not be stored ({e.strerror})"
            log.error("unmounting: %s; everything else is committed", unstored)
            # Their sizes end where their stored bytes do, not at zeros.
            ops.data.cut_sizes(ops.data.stored_ends())
        # Once sealing has failed at the end, trying again only fails again: the
        # metadata commits without it.
        while ops.ns.collect_garbage(GC_BUDGET):
            await ops.txg.commit(seal=unstored is None)
        await ops.txg.commit(seal=unstored is None)
        if unstored is not None:
            raise BackupfsError(f"{self.mountpoint} unmounted, but {unstored}")

    async def _txg_timer(self) -> None:
        full = False
        while True:
            await trio.sleep(self.txg_interval)
            try:
                await self.ops.flush_everything()
                if await self._collect_garbage():
                    await self.ops.txg.commit()
                full = False
            except OSError as e:
                # A full disk: the metadata committed, buffered bytes wait for space.
                # One line when it starts, not a traceback every few seconds.
                if not full:
                    log.warning("transaction group: buffered data not stored: %s", e)
                full = True
            except Exception:
                # The next fsync or group will try again; the mount must stay up.
                log.exception("transaction group failed")

    async def _collect_garbage(self) -> int:
        """Release up to GC_BUDGET records of unlinked files, in pieces with requests
        served in between (0.44-0.72 s without an answer every 5 s, in one piece, while
        a deleted file of 131,072 blocks was released); returns how many inodes are
        still queued."""
        budget, queued = GC_BUDGET, 1
        while budget > 0 and queued:
            queued = self.ops.ns.collect_garbage(min(PIECE, budget))
            budget -= PIECE
            await between_pieces()
        return queued

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("%s: unmounting %s", signal.Signals(signum).name, self.mountpoint)
                # A normal unmount makes the kernel write back its cached pages first.
                done = await trio.to_thread.run_sync(
                    lambda: subprocess.run(["fusermount3", "-u", str(self.mountpoint)],
                                           capture_output=True).returncode == 0)
                if not done:
                    log.warning("%s is busy: writing back and detaching it", self.mountpoint)
                    await self._write_back()
                    pyfuse3.terminate()
                return

    async def _scheduler(self, schedule: Schedule) -> None:
        log.info("scheduled snapshots every %s s, keeping %s", schedule.every, schedule.keep)
        while True:
            await trio.sleep(schedule.every)
            record = await self._scheduled("snapshot", self.control_snapshot,
                                           label=schedule.label)
            if record is None:
                continue
            log.info("scheduled snapshot %s taken", record["name"])
            if not schedule.keep.is_empty():
                await self._scheduled("prune", self._prune, schedule.keep, dry_run=False)
            if schedule.compact_threshold is not None:
                await self._scheduled("compaction", self.control_compact,
                                      schedule.compact_threshold)

    @staticmethod
    async def _scheduled(step: str, fn, *args, **kwargs):
        """One step of the schedule: its result, or None once its failure is logged. A
        failure the daemon expects (a full disk, a held snapshot) is one line, as it may
        come back at every interval; anything else gets its traceback."""
        try:
            return await fn(*args, **kwargs)
        except (OSError, BackupfsError) as e:
            log.warning("scheduled %s failed: %s", step, e)
        except Exception:
            log.exception("scheduled %s failed", step)
        return None

    # -- control socket operations (see control.py) -----------------------------------

    async def control_ping(self) -> dict:
        return {"store": str(self.store_path), "mountpoint": str(self.mountpoint),
                "pid": os.getpid()}

    async def _write_back(self) -> str | None:
        """Make what the kernel caches for the mount reach the daemon. If some of it
        could not be stored (the daemon refused it, say for a full disk), those bytes
        are in neither the live tree nor the store: say so in the log (a writer that
        calls fsync gets the error there too), and return why."""
        try:
            await trio.to_thread.run_sync(_syncfs, self.mountpoint)
        except OSError as e:
            log.error("%s: the kernel could not write back some bytes written to the "
                      "mount (%s): they are not stored", self.mountpoint, e.strerror)
            return e.strerror
        return None

    async def control_snapshot(self, label: str | None = None, hold: bool = False) -> dict:
        # What the kernel still holds in its writeback cache was written before this
        # request: make it reach us before the gate closes.
        lost = await self._write_back()
        torn_since = await self.ops.pull_dirty_pages()
        record = await self.ops.take_snapshot(label=label, hold=bool(hold),
                                              torn_since=torn_since)
        log.info("snapshot %s taken (epoch %d%s)", record.name, record.epoch,
                 f", label {label!r}" if label else "")
        answer = snapshot_dict(record)
        if lost is not None:
            # Taken all the same: it holds the live tree as it is, and refusing it would
            # leave everything else written since the last snapshot unprotected.
            answer["warning"] = (f"some bytes written before this snapshot could not be "
                                 f"stored ({lost}) and are not in it; see the daemon's log")
        return answer

    async def control_list(self) -> list[dict]:
        return [snapshot_dict(r) for r in self.ops.visible_snapshots()]

    async def control_delete(self, names: list[str]) -> list[str]:
        # All known and none held before any goes: a refused delete changes nothing.
        records = list({r.id: r for r in map(self.ops.find_snapshot, names)}.values())
        for r in records:
            if r.hold:
                raise SnapshotHeld(f"snapshot {r.name} is held; release it first")
        for r in records:
            await self.ops.delete_snapshot(r)
        return [r.name for r in records]

    async def control_hold(self, name: str, hold: bool = True) -> dict:
        r = self.ops.ns.set_hold(self.ops.find_snapshot(name).id, bool(hold))
        await self.ops.txg.commit()
        self.ops.snapshots.refresh()
        return snapshot_dict(r)

    async def control_prune(self, policy: dict, dry_run: bool = False) -> list[dict]:
        return await self._prune(KeepPolicy.from_mapping(policy), dry_run)

    async def _prune(self, policy: KeepPolicy, dry_run: bool) -> list[dict]:
        decisions = decide(self.ops.visible_snapshots(), policy)
        if not dry_run:
            for d in decisions:
                if not d.keep:
                    await self.ops.delete_snapshot(d.snapshot, announce="pruned snapshot %s")
        return [{**snapshot_dict(d.snapshot), "keep": d.keep, "reasons": list(d.reasons)}
                for d in decisions]

    async def control_stats(self) -> dict:
        """What the store holds, after sealing what is buffered: `stored_bytes` is what
        live blocks take in packs; `dead_bytes` is what deleted blocks still take until
        compaction rewrites their packs; `decoded_reads` how many reads decoder
        processes answered, and `decoders` how many are running."""
        await self.ops.flush_everything()
        store = self.ops.store
        pack_bytes = sum(store.pack_info(p)[0] for p in store.committed_pack_lengths())
        dead = store.blocks.dead_bytes()
        pool = store.blocks.decoders
        return {"snapshots": len(self.ops.visible_snapshots()), "pack_bytes": pack_bytes,
                "dead_bytes": dead, "stored_bytes": pack_bytes - dead,
                "checksum_errors": store.blocks.checksum_errors,
                "decoded_reads": pool.served if pool else 0,
                "decoders": pool.alive if pool else 0}

    async def control_compact(self, threshold: float = 0.5) -> dict:
        """Rewrite mostly-dead packs one at a time, serving requests in between."""
        store = self.ops.store
        await self.ops.flush_everything()
        result = CompactResult()
        async with self._one_compaction:
            for pack_id in store.blocks.compact_candidates(float(threshold)):
                await self._compact_pack(pack_id, result)
        if result.packs_rewritten or result.corrupt:
            log.info("compacted %d packs, %d bytes freed", result.packs_rewritten,
                     result.bytes_freed)
        return {**asdict(result), "corrupt": [str(e) for e in result.corrupt or []]}

    async def _compact_pack(self, pack_id: int, result: CompactResult) -> None:
        """One pack, with its reading and checking (up to 64 MiB each) in a worker
        thread, and the fsync of what moved in the commit's; a bad live block is noted
        in `result` and its pack stays."""
        c = PackCompaction(self.ops.store.blocks, pack_id)
        try:
            await trio.to_thread.run_sync(c.read)
            await trio.to_thread.run_sync(c.check, c.live())
            c.move()
        except CorruptBlock as e:
            result.corrupt = (result.corrupt or []) + [e]
            return
        await self.ops.txg.commit()
        c.finish(result)

    async def control_flush(self) -> dict:
        """Make the committed state current: written data, and the space of deleted
        files released (what fsck, verify and stats read)."""
        await self._write_back()
        await self.ops.flush_everything()
        while await self._collect_garbage():
            await self.ops.txg.commit()
        await self.ops.txg.commit()
        return {"commits": self.ops.txg.commits}
