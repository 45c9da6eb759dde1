"""The block store: content-addressed, zstd-compressed, verified-on-read blocks in pack
files, indexed in LMDB. The lowest layer; it knows nothing of files or snapshots."""

from .blockstore import BlockLocation, BlockStore, CompactResult
from .codec import HASH_LEN, block_hash
from .config import StoreConfig, parse_size
from .store import Store

__all__ = ["BlockLocation", "BlockStore", "CompactResult", "HASH_LEN", "Store", "StoreConfig",
           "block_hash", "parse_size"]
