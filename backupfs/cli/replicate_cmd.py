"""replicate: a store's snapshots copied into a second store (admin/replication.py)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from ..errors import BackupfsError, StoreInUse
from . import main
from .admin_cmds import current_store, human_size
from .store_cmds import make_store


def _open_replica(dest: Path, like):
    """The destination store, opened for writing; made like `like` (the source's
    configuration) where there is none yet."""
    from ..namespace import Namespace
    from ..store import Store
    from ..store.config import CONFIG_NAME

    if not (dest / CONFIG_NAME).exists():
        make_store(dest, like.block_size, str(like.compression), like.compression.adaptive)
    try:
        store = Store.open(dest)
    except StoreInUse:
        raise BackupfsError(f"{dest}: the destination is in use (mounted?); unmount it "
                            f"while replicating") from None
    try:
        if store.config.block_size != like.block_size:
            raise BackupfsError(
                f"{dest}: block size {store.config.block_size // 1024} KiB, the source's "
                f"is {like.block_size // 1024} KiB: blocks could not be shared")
        return store, Namespace(store)
    except BaseException:
        store.close(commit=False)
        raise


@main.command("replicate")
@click.argument("source", metavar="MOUNTPOINT|STORE")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--rollback", is_flag=True,
              help="Discard what was written into DEST's live tree since its newest "
                   "snapshot (as `zfs receive -F`); refused otherwise.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def replicate_cmd(source, dest, rollback, as_json):
    """Copy a store's snapshots into the store DEST, as `zfs send | zfs receive`.

    DEST is made (like SOURCE) if it is not a store yet. Each run sends the snapshots
    taken since the newest one DEST has, oldest first, with only what changed and only
    the blocks DEST lacks; DEST's live tree is then the newest snapshot. SOURCE may be
    mounted; DEST must not be while this runs (mount it read-only to browse it)."""
    from ..admin.progress import progress_bar
    from ..admin.replication import plan, run
    from ..namespace import Namespace
    from ..store import Store

    source_path = current_store(source)
    if dest.resolve() == source_path.resolve():
        raise BackupfsError(f"{dest}: the destination is the source store")
    src_store = Store.open(source_path, readonly=True)
    results = []
    try:
        src = Namespace(src_store)
        dst_store, dst = _open_replica(dest, src_store.config)
        writing = False  # an error while writing leaves that snapshot uncommitted
        try:
            todo = plan(src, dst, rollback)
            writing = True
            with progress_bar("replicate", unit="record") as bar:
                def progress(name, done, total):
                    if done == 0:
                        bar.reset(total)
                        bar.set_description(f"replicate {name}")
                    bar.update(done - bar.n)
                for sent in run(todo, src, dst, rollback, progress):
                    results.append(sent)
                    if not as_json:
                        bar.write(_describe(sent, dest))
            writing = False
        finally:
            dst_store.close(commit=not writing)
    finally:
        src_store.close()
    if as_json:
        click.echo(json.dumps([asdict(s) for s in results], indent=2))
    elif not any(not s.rollback for s in results):
        click.echo(f"{dest}: up to date")


def _describe(sent, dest: Path) -> str:
    if sent.rollback:
        return f"{dest}: {sent.records} records written since {sent.name} rolled back"
    return (f"{sent.name}: {sent.records} records, {sent.blocks_copied} blocks copied "
            f"({human_size(sent.bytes_copied)}), {sent.blocks_shared} already there")
