"""`verify`: a scrub. Read and re-hash every referenced block, report the bad ones with
every file and snapshot that uses them.

It reads the last committed state through a read-only store, so it runs beside a
mounted daemon without stopping it. Progress is saved to `STORE/verify-state.json`
every few seconds; a run that stops early (`max_duration`, Ctrl-C, a crash) is resumed
by the next one, like `zpool scrub`. A finished run leaves its summary in
`STORE/verify-last.json`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import CorruptBlock
from ..namespace import Namespace
from ..store import Store
from .block_users import paths, users_by_view
from .progress import progress_bar

log = logging.getLogger(__name__)

STATE_NAME = "verify-state.json"
LAST_NAME = "verify-last.json"
SAVE_EVERY = 2.0
CHUNK = 64


@dataclass
class BadBlock:
    hash: str
    pack_id: int
    offset: int
    reason: str
    used_by: list[str] = field(default_factory=list)


@dataclass
class VerifyState:
    scope: str                    # "all" or "snapshot NAME", plus the sample share
    started: float
    position: str = ""            # hex hash of the last block verified
    checked: int = 0
    bytes: int = 0
    bad: list[dict] = field(default_factory=list)
    finished: float | None = None

    @property
    def bad_blocks(self) -> list[BadBlock]:
        return [BadBlock(**b) for b in self.bad]


def _scope(snapshot: str | None, sample: float | None) -> str:
    return f"{'snapshot ' + snapshot if snapshot else 'all'}, sample {sample or 100:g}%"


def _load_state(path: Path, scope: str, restart: bool) -> VerifyState:
    if not restart and path.exists():
        try:
            state = VerifyState(**json.loads(path.read_text()))
            if state.scope == scope:
                log.info("resuming verify from %s (%d blocks done)", state.position[:16],
                         state.checked)
                return state
        except (ValueError, TypeError):
            pass
    return VerifyState(scope=scope, started=time.time())


def _save(path: Path, state: VerifyState) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state)))
    os.replace(tmp, path)


def _in_sample(h: bytes, sample: float | None) -> bool:
    return sample is None or int.from_bytes(h[:4], "big") < sample / 100 * 2**32


def blocks_to_verify(store, ns, snapshot_epoch: int | None, sample: float | None,
                     after: bytes) -> list:
    """Locations of the referenced blocks in scope, in hash order, after `after`."""
    if snapshot_epoch is None:
        wanted = None
    else:
        wanted = {h for _, h in ns.blockmap.scan(b"", snapshot_epoch)}
    out = []
    for loc in store.blocks.iter_locations():
        if loc.hash <= after or loc.refcount == 0 or not _in_sample(loc.hash, sample):
            continue
        if wanted is None or loc.hash in wanted:
            out.append(loc)
    return out


def _check(store, loc) -> tuple[object, int, Exception | None]:
    try:
        # Full: the BLAKE3 address too, not only the checksum a read checks.
        return loc, len(store.blocks.read_verified(loc, full=True)), None
    except (CorruptBlock, OSError) as e:
        return loc, 0, e


def verify(path, snapshot: str | None = None, sample: float | None = None,
           max_duration: float | None = None, restart: bool = False,
           show_progress: bool | None = None) -> VerifyState:
    """Scrub the store at `path` (read-only; a daemon may be running on it)."""
    path = Path(path)
    state_path = path / STATE_NAME
    state = _load_state(state_path, _scope(snapshot, sample), restart)
    deadline = None if max_duration is None else time.monotonic() + max_duration
    with Store.open(path, readonly=True) as store:
        ns = Namespace(store)
        epoch = ns.find_snapshot(snapshot).epoch if snapshot else None
        todo = blocks_to_verify(store, ns, epoch, sample, bytes.fromhex(state.position))
        suspects, paused = _scrub(store, todo, state, state_path, deadline, show_progress)
    # Failures are looked at again in the index as it is now: a running daemon may have
    # compacted a block into another pack meanwhile. (A read-only LMDB environment's
    # database handles die with their transaction, hence a new Store.)
    with Store.open(path, readonly=True) as store:
        for h in suspects:
            if store.blocks.refcount(h):
                _count(state, *_check(store, store.blocks.locate(h)))
        if paused:
            _save(state_path, state)
            log.info("verify paused after %d blocks; the next run resumes", state.checked)
            return state
        name_users(Namespace(store), state)
    state.finished = time.time()
    state_path.unlink(missing_ok=True)
    _save(path / LAST_NAME, state)
    return state


def _scrub(store, todo: list, state: VerifyState, state_path: Path, deadline: float | None,
           show_progress: bool | None) -> tuple[list[bytes], bool]:
    """Verify the blocks in `todo`, saving progress; returns (blocks that failed, paused)."""
    last_save = time.monotonic()
    suspects = []
    with progress_bar("verify", total=len(todo), unit="blk", enabled=show_progress) as bar, \
            ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for start in range(0, len(todo), CHUNK):
            for loc, size, err in pool.map(lambda l: _check(store, l), todo[start:start + CHUNK]):
                state.position = loc.hash.hex()
                if err is None:
                    _count(state, loc, size, None)
                else:
                    suspects.append(loc.hash)
            bar.update(min(CHUNK, len(todo) - start))
            if time.monotonic() - last_save > SAVE_EVERY:
                _save(state_path, state)
                last_save = time.monotonic()
            if deadline is not None and time.monotonic() > deadline:
                return suspects, True
    return suspects, False


def _count(state: VerifyState, loc, size: int, err: Exception | None) -> None:
    state.checked += 1
    state.bytes += size
    if err is not None:
        reason = getattr(err, "reason", None) or str(err)
        state.bad.append(asdict(BadBlock(loc.hash.hex(), loc.pack_id, loc.offset, reason)))


def name_users(ns, state: VerifyState) -> None:
    """Fill in, for each bad block, every path in the live tree and the snapshots that
    uses it: the oldest view's block map once, then what changed (block_users.py)."""
    bad = {bytes.fromhex(b["hash"]): b for b in state.bad}
    if not bad:
        return
    records = ns.snapshots()
    where = {r.epoch: f"snapshot {r.name}" for r in records}
    where[ns.epoch] = "live"
    named = {h: set(b["used_by"]) for h, b in bad.items()}  # a block in many files is many uses
    for epoch, users in users_by_view(ns, [r.epoch for r in records] + [ns.epoch], set(bad)):
        view = ns.live if epoch == ns.epoch else ns.view(epoch)
        for ino, names in paths(ns, view, users).items():
            for path in names:
                use = f"{where[epoch]}: {path.decode(errors='surrogateescape')}"
                for h in users[ino]:
                    if use not in named[h]:
                        named[h].add(use)
                        bad[h]["used_by"].append(use)
