"""`Store`: one opened store directory: its config, index, packs and the open transaction.

All metadata changes of a process go into one LMDB write transaction, `Store.txn`, that
stays open until `commit()` closes the transaction group: packs are fsynced first, then
their committed lengths and every metadata change commit in one LMDB transaction. A crash
before the commit loses the whole group and nothing else; a crash after it loses nothing.

LMDB write transactions belong to the thread that began them: only the thread that opened
the store (the trio thread in the daemon) may touch `txn`. Worker threads only hash,
compress, decompress and read pack bytes.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from dataclasses import replace
from pathlib import Path

import lmdb

from ..errors import StoreError, StoreInUse
from .config import CONFIG_NAME, DEFAULT_COMPRESSION, Compression, StoreConfig
from .index import INDEX_DIR, open_environment
from .packs import DEFAULT_ROTATE_SIZE, PackSet

log = logging.getLogger(__name__)

LOCK_NAME = "lock"
# Present while a writer has the store open; found at open, it means the last writer
# stopped without closing (crash, kill -9, power loss).
WRITER_MARK = "writer.pid"
PACKS_DIR = "packs"

# packs db: pack id (u32) -> committed length (u64), dead bytes (u64)
PACK_KEY = struct.Struct(">I")
PACK_VALUE = struct.Struct(">QQ")


def _write_file_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Store:
    """An open store. Create with `Store.init`, open with `Store.open`, close with `close`."""

    def __init__(self, path: Path, config: StoreConfig, env: lmdb.Environment,
                 readonly: bool, lock_fd: int | None, rotate_size: int):
        self.path = path
        self.config = config
        self.env = env
        self.readonly = readonly
        self._lock_fd = lock_fd
        self._dbs: dict[str, object] = {}
        self.unclean_shutdown = False
        if not readonly:
            mark = path / WRITER_MARK
            self.unclean_shutdown = mark.exists()
            if self.unclean_shutdown:
                log.warning("%s: the last writer did not close the store (crash or kill); "
                            "recovering", path)
            mark.write_text(f"{os.getpid()}\n")
        self.packs = PackSet(path / PACKS_DIR, rotate_size=rotate_size, readonly=readonly)
        self.txn: lmdb.Transaction = env.begin(write=not readonly)
        self.packs_db = self.open_db("packs")
        self._pending_pack_lengths: dict[int, int] = {}
        self.recovery_actions = self.packs.recover(self.committed_pack_lengths())
        for line in self.recovery_actions:
            log.warning("recovery: %s", line)
        # Imported here: blockstore builds on Store, Store offers it as `.blocks`.
        from .blockstore import BlockStore

        self.blocks = BlockStore(self)
        if not readonly:
            self.commit()  # makes the databases opened above durable and visible

    # -- creating and opening ------------------------------------------------------

    @staticmethod
    def init(path: str | os.PathLike, block_size: int | None = None,
             compression: str | None = None, adaptive_compression: bool = True) -> StoreConfig:
        """Create a new, empty store at `path` (which must not exist or be empty)."""
        path = Path(path)
        if path.exists():
            if not path.is_dir():
                raise StoreError(f"{path}: exists and is not a directory")
            if (path / CONFIG_NAME).exists():
                raise StoreError(f"{path}: is already a backupfs store")
            if any(path.iterdir()):
                raise StoreError(f"{path}: directory is not empty; refusing to make a store in it")
        kwargs = {}
        if block_size is not None:
            kwargs["block_size"] = block_size
        kwargs["compression"] = replace(Compression.parse(compression or DEFAULT_COMPRESSION),
                                        adaptive=adaptive_compression)
        config = StoreConfig(**kwargs)
        config.validate()
        try:
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o700)
            (path / PACKS_DIR).mkdir(mode=0o700)
            env = open_environment(path, create=True)
            with env.begin(write=True) as txn:
                env.open_db(b"packs", txn=txn)
            env.close()
            # config.toml last: its presence is what makes the directory a store.
            _write_file_durably(path / CONFIG_NAME, config.to_toml().encode())
        except OSError as e:
            raise StoreError(f"{path}: cannot create store: {e.strerror}") from None
        return config

    @classmethod
    def open(cls, path: str | os.PathLike, readonly: bool = False,
             rotate_size: int = DEFAULT_ROTATE_SIZE) -> "Store":
        """Open an existing store. A writable open takes the store's lock (one writer)."""
        path = Path(path)
        if not path.exists():
            raise StoreError(f"{path}: no such store")
        if not path.is_dir():
            raise StoreError(f"{path}: not a backupfs store (not a directory)")
        config = StoreConfig.load(path)
        if not (path / INDEX_DIR).is_dir():
            raise StoreError(f"{path}: not a backupfs store (no {INDEX_DIR})")
        lock_fd = None
        if not readonly:
            lock_fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(lock_fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StoreInUse(
                        f"{path}: store is in use by another process (is it mounted?)"
                    ) from None
                raise
        try:
            env = open_environment(path, readonly=readonly)
            return cls(path, config, env, readonly, lock_fd, rotate_size)
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise

    # -- databases -----------------------------------------------------------------

    def open_db(self, name: str, **flags) -> object:
        """The handle of a named database, created (in the open transaction) if needed."""
        db = self._dbs.get(name)
        if db is None:
            key = name.encode()
            if self.readonly:
                try:
                    db = self.env.open_db(key, txn=self.txn, create=False, **flags)
                except lmdb.NotFoundError:
                    raise StoreError(f"{self.path}: index lacks database {name!r}") from None
            else:
                db = self.env.open_db(key, txn=self.txn, **flags)
            self._dbs[name] = db
        return db

    # -- packs bookkeeping ---------------------------------------------------------

    def committed_pack_lengths(self) -> dict[int, int]:
        out = {}
        for k, v in self.txn.cursor(db=self.packs_db):
            out[PACK_KEY.unpack(k)[0]] = PACK_VALUE.unpack(v)[0]
        return out

    def pack_info(self, pack_id: int) -> tuple[int, int]:
        """(committed or pending length, dead bytes) of a pack."""
        v = self.txn.get(PACK_KEY.pack(pack_id), db=self.packs_db)
        length, dead = PACK_VALUE.unpack(v) if v else (0, 0)
        return self.packs.length(pack_id) or length, dead

    def add_dead_bytes(self, pack_id: int, delta: int) -> None:
        k = PACK_KEY.pack(pack_id)
        v = self.txn.get(k, db=self.packs_db)
        length, dead = PACK_VALUE.unpack(v) if v else (self.packs.length(pack_id), 0)
        self.txn.put(k, PACK_VALUE.pack(length, max(0, dead + delta)), db=self.packs_db)

    def drop_pack_record(self, pack_id: int) -> None:
        self.packs.retire(pack_id)
        self.txn.delete(PACK_KEY.pack(pack_id), db=self.packs_db)

    # -- transaction groups --------------------------------------------------------

    def commit(self) -> None:
        """Close the transaction group: fsync packs, then commit the index durably."""
        if self.readonly:
            raise StoreError("a read-only store has nothing to commit; open it again "
                             "to see what writers committed since")
        # Packs may have been synced already (by a worker thread, see fs.txg); whatever
        # was synced since the last commit is recorded now, and only bytes that are on
        # disk are ever referenced by a committed index.
        self.packs.sync()
        for pack_id, length in self.packs.take_synced_lengths().items():
            k = PACK_KEY.pack(pack_id)
            v = self.txn.get(k, db=self.packs_db)
            dead = PACK_VALUE.unpack(v)[1] if v else 0
            self.txn.put(k, PACK_VALUE.pack(length, dead), db=self.packs_db)
        self.txn.commit()
        self.txn = self.env.begin(write=True)

    def close(self, commit: bool = True) -> None:
        """Commit (unless told not to) and release everything, the lock last."""
        if self.txn is not None:
            if commit and not self.readonly:
                self.commit()
            self.txn.abort()
            self.txn = None
        self.packs.close()
        self.env.close()
        if self._lock_fd is not None:
            if commit:  # closed cleanly: the next writer has nothing to recover
                (self.path / WRITER_MARK).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(commit=exc_type is None)
