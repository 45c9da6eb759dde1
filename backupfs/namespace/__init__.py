"""The versioned namespace: inodes, directory entries, block maps and xattrs, each
versioned by epoch, so snapshots cost O(1) (see docs/architecture.md)."""

from .catalog import SnapshotHeld, SnapshotNotFound, SnapshotRecord
from .live import RENAME_EXCHANGE, RENAME_NOREPLACE, XATTR_CREATE, XATTR_REPLACE, LiveView
from .namespace import Namespace
from .records import ROOT_INO, Attr
from .view import NamespaceView

__all__ = ["Namespace", "NamespaceView", "LiveView", "Attr", "SnapshotRecord", "ROOT_INO",
           "RENAME_NOREPLACE", "RENAME_EXCHANGE", "XATTR_CREATE", "XATTR_REPLACE",
           "SnapshotNotFound", "SnapshotHeld"]
