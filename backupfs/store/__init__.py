"""The block store: content-addressed, zstd-compressed, verified-on-read blocks in pack
files, indexed in LMDB. The lowest layer; it knows nothing of files or snapshots.

Names are loaded on first use, so `backupfs.store.config` (what the CLI needs to parse
its options) does not pull in trio, LMDB and zstd for every command."""

from importlib import import_module

_WHERE = {"BlockLocation": "blockstore", "BlockStore": "blockstore", "CompactResult": "compaction",
          "HASH_LEN": "codec", "block_hash": "codec", "StoreConfig": "config",
          "parse_size": "config", "Store": "store"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
