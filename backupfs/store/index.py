"""The LMDB environment that holds every layer's metadata, in named databases.

One environment per store (`STORE/index.lmdb/`). Each layer opens the databases it owns
by name; keys are packed big-endian so LMDB's byte order is the scan order.
LMDB is opened with full durability: a commit returns only once it is on disk.
"""

from __future__ import annotations

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
# session). A big index read at random does not pay for this for long: the kernel stops
# reading around a mapping once its faults that found nothing read ahead outnumber
# those that did by 100 (MMAP_LOTSAMISS in mm/filemap.c).
INDEX_READAHEAD = True


def open_environment(store_dir: Path, readonly: bool = False, create: bool = False) -> lmdb.Environment:
    path = Path(store_dir) / INDEX_DIR
    if not create and not (path / "data.mdb").exists():
        raise StoreError(f"{store_dir}: not a backupfs store (no {INDEX_DIR})")
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
            readahead=INDEX_READAHEAD,
            meminit=False,
            max_readers=256,
            lock=True,
        )
    except lmdb.Error as e:
        raise StoreError(f"{store_dir}: cannot open the index: {e}") from None
