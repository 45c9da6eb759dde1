"""Where pack files live under a store's packs directory (format.md, "Pack files").

A module of its own so that a decoder process (decoder.py) can find packs without
importing packs.py, which pulls in the pack writer and libc bindings it never uses: a
decoder that imports less is ready sooner after a mount starts it."""

from __future__ import annotations

from pathlib import Path


def pack_path(root: Path, pack_id: int) -> Path:
    """Where pack `pack_id` of the packs directory `root` lives."""
    return root / f"{pack_id >> 8:02x}" / f"{pack_id:06d}.pack"
