"""The LMDB environment that holds every layer's metadata, in named databases.

One environment per store (`STORE/index.lmdb/`). Each layer opens the databases it owns
by name; keys are packed big-endian so LMDB's byte order is the scan order.
LMDB is opened with full durability: a commit returns only once it is on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import lmdb

from ..errors import StoreError

INDEX_DIR = "index.lmdb"
MAP_SIZE = 1 << 40  # address space only: the file grows as data is written
MAX_DBS = 32
# The kernel may read around a page of the map it faults in. With LMDB's NORDAHEAD every
# cold page was its own synchronous 4 KiB read, in the event loop's thread: a cold 1 GiB
# read through the mount ran at 340-344 MB/s with it and 400-507 without, and a cold
# `ls -l` of 10,000 files took 0.37-0.46 s against 0.28-0.35 (interleaved, eighth
# session). That pays while the index fits in memory: what is read around stays. An
# index much bigger than memory is read at random for good (block hashes are random
# keys), and each miss would then read the disk's whole read-ahead (up to several MiB
# on a RAID) for one page, so such an index keeps NORDAHEAD.
READ_AROUND_MAX_SHARE = 4  # read around while the index is at most 1/4 of memory


def reads_around(index_bytes: int, memory_bytes: int) -> bool:
    """Whether to let the kernel read around cold pages of an index this big."""
    return index_bytes <= memory_bytes // READ_AROUND_MAX_SHARE


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def open_environment(store_dir: Path, readonly: bool = False, create: bool = False) -> lmdb.Environment:
    path = Path(store_dir) / INDEX_DIR
    try:
        index_bytes = (path / "data.mdb").stat().st_size
    except (FileNotFoundError, NotADirectoryError):  # what Path.exists() took as absent
        if not create:
            raise StoreError(f"{store_dir}: not a backupfs store (no {INDEX_DIR})") from None
        index_bytes = 0
    try:
        return lmdb.open(
            str(path),
            map_size=MAP_SIZE,
            max_dbs=MAX_DBS,
            subdir=True,
            readonly=readonly,
            create=create,
            sync=True,
            metasync=True,
            readahead=reads_around(index_bytes, _memory_bytes()),
            meminit=False,
            max_readers=256,
            lock=True,
        )
    except lmdb.Error as e:
        raise StoreError(f"{store_dir}: cannot open the index: {e}") from None
