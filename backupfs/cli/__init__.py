"""The `backupfs` command. Each command group lives in its own module and registers itself
on `main`; this module only sets up logging and turns user errors into one-line messages."""

from __future__ import annotations

import logging
import sys

import click

from ..errors import BackupfsError
from ..heap import keep_freed_memory


class BackupfsGroup(click.Group):
    """Runs commands so that a BackupfsError is one line on stderr and a non-zero exit."""

    def main(self, *args, **kwargs):
        # `python -m backupfs` would otherwise call itself "python -m backupfs" in usage lines.
        kwargs.setdefault("prog_name", "backupfs")
        return super().main(*args, **kwargs)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BackupfsError as e:
            click.echo(f"backupfs: {e}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=BackupfsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="backupfs")
def main(verbose: int) -> None:
    """backupfs: a backup filesystem with instant snapshots and verified, deduplicated storage."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    keep_freed_memory()


# Command modules register themselves on `main` when imported.
from . import admin_cmds, mount_cmds, replicate_cmd, snapshot_cmds, store_cmds  # noqa: E402,F401
