"""The filesystem layer: pyfuse3 Operations over the namespace and the block store."""

from .operations import BackupFS
from .txg import TransactionGroups

__all__ = ["BackupFS", "TransactionGroups"]
