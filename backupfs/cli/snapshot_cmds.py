"""snapshot, list, delete, hold, release, prune: talk to the daemon over the control socket."""

from __future__ import annotations

import json
from datetime import datetime

import click

from ..daemon.protocol import ControlClient
from . import main
from .target import resolve_store

TARGET = click.argument("target", metavar="MOUNTPOINT|STORE")


def _client(target: str) -> ControlClient:
    return ControlClient(resolve_store(target))


def _when(created_ns: int) -> str:
    return datetime.fromtimestamp(created_ns / 1e9).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


@main.command("snapshot")
@TARGET
@click.option("--label", help="A note kept with the snapshot (shown by `list`).")
@click.option("--hold", is_flag=True, help="Never delete or prune it until released.")
def snapshot_cmd(target, label, hold):
    """Take a snapshot now; prints its directory name under /snapshots."""
    r = _client(target).call("snapshot", label=label, hold=hold)
    click.echo(r["name"])
    if r.get("warning"):
        click.echo(f"backupfs: warning: {r['warning']}", err=True)


@main.command("list")
@TARGET
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(target, as_json):
    """List snapshots, oldest first."""
    snaps = _client(target).call("list")
    if as_json:
        click.echo(json.dumps(snaps, indent=2))
        return
    if not snaps:
        click.echo("no snapshots")
        return
    click.echo(f"{'NAME':<22} {'CREATED':<25} {'HOLD':<5} LABEL")
    for s in snaps:
        click.echo(f"{s['name']:<22} {_when(s['created_ns']):<25} "
                   f"{'yes' if s['hold'] else '':<5} {s['label'] or ''}")


@main.command("delete")
@TARGET
@click.argument("names", nargs=-1, required=True)
def delete_cmd(target, names):
    """Delete snapshots by name (held ones are refused)."""
    for name in _client(target).call("delete", names=list(names)):
        click.echo(f"deleted {name}")


@main.command("hold")
@TARGET
@click.argument("name")
def hold_cmd(target, name):
    """Hold a snapshot: it cannot be deleted or pruned until released."""
    r = _client(target).call("hold", name=name, hold=True)
    click.echo(f"holding {r['name']}")


@main.command("release")
@TARGET
@click.argument("name")
def release_cmd(target, name):
    """Release a held snapshot."""
    r = _client(target).call("hold", name=name, hold=False)
    click.echo(f"released {r['name']}")


@main.command("prune")
@TARGET
@click.option("--keep-last", type=click.IntRange(0), default=0, help="Keep the N newest.")
@click.option("--keep-hourly", type=click.IntRange(0), default=0, help="Newest of each of N hours.")
@click.option("--keep-daily", type=click.IntRange(0), default=0, help="Newest of each of N days.")
@click.option("--keep-weekly", type=click.IntRange(0), default=0, help="Newest of each of N ISO weeks.")
@click.option("--keep-monthly", type=click.IntRange(0), default=0, help="Newest of each of N months.")
@click.option("--keep-yearly", type=click.IntRange(0), default=0, help="Newest of each of N years.")
@click.option("--dry-run", "-n", is_flag=True, help="Only say what would be deleted and why.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def prune_cmd(target, keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly,
              keep_yearly, dry_run, as_json):
    """Delete the snapshots no keep rule keeps (restic's rules; held ones always stay)."""
    policy = {"last": keep_last, "hourly": keep_hourly, "daily": keep_daily,
              "weekly": keep_weekly, "monthly": keep_monthly, "yearly": keep_yearly}
    if not any(policy.values()):
        raise click.UsageError("give at least one --keep-* rule")
    decisions = _client(target).call("prune", policy=policy, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(decisions, indent=2))
        return
    verb = "would delete" if dry_run else "deleted"
    for d in decisions:
        if d["keep"]:
            click.echo(f"keep   {d['name']}  ({', '.join(d['reasons'])})")
        else:
            click.echo(f"{verb} {d['name']}")
