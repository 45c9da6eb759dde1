"""Commands that work on a store directory without a mount: init (and making a store,
for replicate too)."""

from __future__ import annotations

import click

from ..store.config import DEFAULT_COMPRESSION, parse_size
from . import main


def make_store(path, block_size: int, compression: str, adaptive_compression: bool):
    """A new store with its empty tree committed; its StoreConfig."""
    from ..namespace import Namespace
    from ..store import Store

    config = Store.init(path, block_size=block_size, compression=compression,
                        adaptive_compression=adaptive_compression)
    with Store.open(path) as s:
        Namespace(s)  # the root directory and the namespace's databases
    return config


@main.command("init")
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--block-size", default="128K", show_default=True,
              help="Block size: a power of two from 4K to 4M. Fixed for the store's life.")
@click.option("--compression", default=DEFAULT_COMPRESSION, show_default=True,
              help="zstd:LEVEL (-7..22) or none.")
@click.option("--adaptive-compression/--fixed-compression", default=True, show_default=True,
              help="While writes come in faster than zstd LEVEL compresses, compress at "
                   "level 1 (as zstd --adapt does); --fixed-compression always uses LEVEL.")
def init_cmd(store: str, block_size: str, compression: str, adaptive_compression: bool) -> None:
    """Create a new, empty store in STORE (a new or empty directory)."""
    config = make_store(store, parse_size(block_size), compression, adaptive_compression)
    adaptive = ", adaptive" if config.compression.adapts else ""
    click.echo(f"initialised backupfs store {store} (block size "
               f"{config.block_size // 1024} KiB, compression {config.compression}{adaptive})")
