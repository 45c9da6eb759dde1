"""Commands that work on a store directory without a mount: init."""

from __future__ import annotations

import click

from ..store.config import DEFAULT_COMPRESSION, parse_size
from . import main


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
    from ..namespace import Namespace
    from ..store import Store

    config = Store.init(store, block_size=parse_size(block_size), compression=compression,
                        adaptive_compression=adaptive_compression)
    with Store.open(store) as s:
        Namespace(s)  # the root directory and the namespace's databases
    adaptive = ", adaptive" if config.compression.adapts else ""
    click.echo(f"initialised backupfs store {store} (block size "
               f"{config.block_size // 1024} KiB, compression {config.compression}{adaptive})")
