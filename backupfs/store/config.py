"""The store's `config.toml`: format version, block size, compression, schedule.

The file is written once by `init` (block size and format never change for a store);
the daemon reads the `[schedule]` table again at every mount.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import tomli_w

from ..errors import StoreError

# 2: records carry an XXH3-128 checksum that reads check (codec.CHECKED). Stores of
# version 1 are read and written as they are, so the backupfs that made them still can.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_NAME = "config.toml"
DEFAULT_BLOCK_SIZE = 128 * 1024
DEFAULT_COMPRESSION = "zstd:3"
MIN_BLOCK_SIZE = 4 * 1024
MAX_BLOCK_SIZE = 4 * 1024 * 1024

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmM]?)(i?[bB])?\s*$")


def parse_size(text: str | int) -> int:
    """'128K' / '1M' / '131072' -> bytes (binary units, as `dd` and `mkfs` read them)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise StoreError(f"not a size: {text!r} (use e.g. 128K or 1M)")
    number, unit = int(m.group(1)), m.group(2).lower()
    return number * {"": 1, "k": 1024, "m": 1024 * 1024}[unit]


# While writes come in faster than the configured level compresses them, blocks are
# compressed at this level instead (as `zstd --adapt` does). On 2 cores, zstd level 3
# capped a sequential write below the disk's speed; level 1 compresses 1.5-3x faster
# for output 0-6% larger (docs/performance.md). Every block records only its codec, so
# any level reads back the same way.
HURRIED_LEVEL = 1


@dataclass(frozen=True)
class Compression:
    codec: str  # "zstd" or "none"
    level: int = 0
    adaptive: bool = True  # may use HURRIED_LEVEL while writes outpace `level`

    @property
    def adapts(self) -> bool:
        """Whether hurried writes get a faster level than this one."""
        return self.codec == "zstd" and self.adaptive and self.level > HURRIED_LEVEL

    def hurried(self) -> "Compression":
        """The compression to use while writes come in faster than this one keeps up."""
        return Compression("zstd", HURRIED_LEVEL, adaptive=False) if self.adapts else self

    @classmethod
    def parse(cls, text: str) -> "Compression":
        name, _, level = text.partition(":")
        name = name.strip().lower()
        if name in ("none", "raw"):
            return cls("none", 0)
        if name != "zstd":
            raise StoreError(f"unknown compression {text!r} (use zstd:LEVEL or none)")
        try:
            lvl = int(level) if level else 3
        except ValueError:
            raise StoreError(f"bad zstd level in {text!r}") from None
        if not -7 <= lvl <= 22:
            raise StoreError(f"zstd level must be between -7 and 22, not {lvl}")
        return cls("zstd", lvl)

    def __str__(self) -> str:
        return "none" if self.codec == "none" else f"zstd:{self.level}"


@dataclass(frozen=True)
class StoreConfig:
    format_version: int = FORMAT_VERSION
    block_size: int = DEFAULT_BLOCK_SIZE
    compression: Compression = Compression("zstd", 3)
    # Everything else in the file (the [schedule] table and future keys) is kept as read.
    extra: dict = field(default_factory=dict)

    @property
    def checked_records(self) -> bool:
        """Whether new records carry the checksum reads check (format version 2)."""
        return self.format_version >= 2

    def validate(self) -> None:
        bs = self.block_size
        if bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
            raise StoreError(
                f"block size must be a power of two between 4K and 4M, not {bs}"
            )

    def to_toml(self) -> str:
        doc = {
            "format_version": self.format_version,
            "block_size": self.block_size,
            "compression": str(self.compression),
            "adaptive_compression": self.compression.adaptive,
            **self.extra,
        }
        header = "# backupfs store configuration. format_version and block_size are fixed at init.\n"
        return header + tomli_w.dumps(doc)

    @classmethod
    def load(cls, store_dir: Path) -> "StoreConfig":
        path = Path(store_dir) / CONFIG_NAME
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise StoreError(f"{store_dir}: not a backupfs store (no {CONFIG_NAME})") from None
        except tomllib.TOMLDecodeError as e:
            raise StoreError(f"{path}: unreadable configuration: {e}") from None
        except OSError as e:
            raise StoreError(f"{path}: {e.strerror}") from None
        version = doc.pop("format_version", None)
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise StoreError(
                f"{store_dir}: store format version {version!r} is not supported "
                f"(this backupfs reads versions 1 and {FORMAT_VERSION})"
            )
        try:
            compression = Compression.parse(doc.pop("compression", DEFAULT_COMPRESSION))
            adaptive = doc.pop("adaptive_compression", True)
            if not isinstance(adaptive, bool):
                raise StoreError(f"adaptive_compression must be true or false, not {adaptive!r}")
            cfg = cls(
                format_version=version,
                block_size=parse_size(doc.pop("block_size", DEFAULT_BLOCK_SIZE)),
                compression=replace(compression, adaptive=adaptive),
                extra=doc,
            )
        except StoreError as e:
            raise StoreError(f"{path}: {e}") from None
        cfg.validate()
        return cfg
