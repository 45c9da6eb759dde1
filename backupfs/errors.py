"""Exceptions shared by every layer.

`BackupfsError` is what the CLI turns into a one-line message and a non-zero exit;
anything else reaching the CLI is a bug and keeps its traceback.
"""


class BackupfsError(Exception):
    """An error the user can act on; its message is shown as is."""

    exit_code = 1


class StoreError(BackupfsError):
    """The store is missing, foreign, locked or of an unknown format."""


class StoreInUse(StoreError):
    """Another process (usually the mounting daemon) holds the store's lock."""


class CorruptBlock(BackupfsError):
    """A block's bytes do not match its hash: the caller must never see them.

    The filesystem turns this into EIO; verify and fsck report it. A read through the
    mount fills in `file` (how to name the file: its path, else its inode) and
    `file_block` (the block's number in it) for its log line.
    """

    def __init__(self, block_hash: bytes, pack_id: int, offset: int, reason: str):
        self.block_hash = block_hash
        self.pack_id = pack_id
        self.offset = offset
        self.reason = reason
        self.file: str | None = None
        self.file_block: int | None = None
        super().__init__(
            f"corrupt block {block_hash.hex()} in pack {pack_id} at offset {offset}: {reason}"
        )


class MissingBlock(BackupfsError):
    """A hash was asked for that the index does not know."""

    def __init__(self, block_hash: bytes):
        self.block_hash = block_hash
        super().__init__(f"block {block_hash.hex()} is not in the store")
