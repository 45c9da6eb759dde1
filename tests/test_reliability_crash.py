"""Crash cycles: a mixed workload, the daemon SIGKILLed at a random moment, again and again.

After every kill: the store passes fsck, mounts, every fsynced file has its content, and
every snapshot reported taken is there, unchanged (or, if its deletion had started, gone).
BACKUPFS_RELIABILITY=full runs 100 cycles instead of the CI count.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mounting import backupfs

FULL = os.environ.get("BACKUPFS_RELIABILITY") == "full"
CYCLES = 100 if FULL else 8
TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))
from crash_workload import content, manifest  # noqa: E402

pytestmark = [pytest.mark.mount, pytest.mark.reliability,
              pytest.mark.timeout(3600 if FULL else 420)]


def read_journal(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    # A line cut by the kill is not a promise.
    return [json.loads(line) for line in lines if line.endswith("}")]


def check_promises(mnt: Path, journal: list[dict]) -> tuple[int, int]:
    files = snapshots = 0
    # Each snapshot name's last event and the manifest it was taken with. A name a
    # deletion freed may be taken again by a snapshot in the same second, even in the
    # next cycle: then only the later snapshot's fate counts.
    fate: dict[str, tuple[str, dict]] = {}
    deleting_at: dict[str, int] = {}
    for entry in journal:
        if entry["kind"] == "file":
            data = (mnt / entry["name"]).read_bytes()
            assert len(data) == entry["size"], entry["name"]
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["name"]
            assert data == content(entry["seed"], entry["seq"], entry["size"])
            files += 1
        elif entry["kind"] == "snapshot":
            fate[entry["name"]] = ("taken", entry["manifest"])
        else:  # "deleting", then "deleted" once the command has answered
            fate[entry["name"]] = (entry["kind"], fate[entry["name"]][1])
            deleting_at[entry["name"]] = entry.get("at_ns", deleting_at.get(entry["name"]))
    created = {s["name"]: s["created_ns"]
               for s in json.loads(backupfs("list", mnt, "--json").stdout)}
    for name, (event, taken) in fate.items():
        path = mnt / "snapshots" / name
        if event == "deleted":
            # Unless a snapshot taken after the deletion began got the name again (the
            # kill came before the workload had written it down).
            assert not path.exists() or created[name] > deleting_at[name], \
                f"deleted snapshot {name} is back"
        elif event == "deleting" and not path.exists():
            pass  # the kill came during its deletion
        else:
            assert manifest(path) == taken, f"snapshot {name} changed"
            snapshots += 1
    return files, snapshots


def test_sigkill_at_random_moments_loses_nothing_promised(mount_factory, tmp_path):
    rng = random.Random(int(os.environ.get("BACKUPFS_SEED", "0")) or None)
    m = mount_factory("crash", txg_interval=1.0)
    journal_path = tmp_path / "journal.jsonl"
    checked = (0, 0)
    for cycle in range(CYCLES):
        m.start()
        if cycle:
            checked = check_promises(m.path, read_journal(journal_path))
        workload = subprocess.Popen(
            [sys.executable, str(TOOLS / "crash_workload.py"), str(m.path), str(journal_path),
             "--seed", str(cycle + 1), "--snapshot-every", "0.4"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.5, 2.5))
        # SIGKILL: no flush, no commit, no unmount. The workload dies with the daemon,
        # before the dead mount is detached (after that the path is a plain directory).
        m.proc.kill()
        m.proc.wait()
        workload.kill()
        workload.wait()
        m.kill()
        r = backupfs("fsck", m.store, "--json", check=False)
        report = json.loads(r.stdout)
        assert r.returncode == 0 and report["problems"] == [], \
            f"cycle {cycle}: fsck after the kill:\n{json.dumps(report['problems'], indent=1)}"
    m.start()
    files, snapshots = check_promises(m.path, read_journal(journal_path))
    assert files > 0 and (snapshots > 0 or not FULL)
    m.stop()
    r = backupfs("fsck", m.store, "--json", check=False)
    assert r.returncode == 0, r.stdout
    print(f"{CYCLES} crash cycles: {files} fsynced files and {snapshots} snapshots intact "
          f"(checked {checked[0]} files mid-run)")


def test_a_crash_during_a_big_truncate_keeps_the_old_file_or_the_new(mount_factory):
    """SIGKILL while a truncate releases 65,535 stored blocks a chunk at a time, with the
    transaction group committing every 50 ms meanwhile: the store passes fsck and the
    file is whole as before, or cut, and then grows back with zeros, never old bytes."""
    m = mount_factory("trunc", init_args=("--block-size", "4K"), txg_interval=0.05)
    chunk = os.urandom(4096) * 256
    old_size = len(chunk) * 256
    # Killed twice in the middle of the release (it takes ~1.2 s here), once after it.
    for delay in (0.3, 0.7, 3.0):
        m.start()
        big = m.path / "big"
        if not big.exists() or big.stat().st_size != old_size:
            with open(big, "wb") as f:
                for _ in range(256):
                    f.write(chunk)  # deduplicated: 65,536 block map entries, one block
                os.fsync(f.fileno())

        def truncate() -> None:
            try:
                os.truncate(big, 4096)
            except OSError:
                pass  # the daemon died under it

        worker = threading.Thread(target=truncate)
        worker.start()
        time.sleep(delay)
        m.kill()
        worker.join(30)
        r = backupfs("fsck", m.store, "--json", check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        m.start()
        size = big.stat().st_size
        with open(big, "rb") as f:
            if size == old_size:
                for off in (0, old_size // 2, old_size - 4096):
                    assert os.pread(f.fileno(), 4096, off) == chunk[off % len(chunk):][:4096]
            else:
                assert size == 4096, size
                assert f.read() == chunk[:4096]
        if size == 4096:
            os.truncate(big, old_size)  # grown back: zeros, not the blocks cut off
            with open(big, "rb") as f:
                for off in (4096, old_size // 2, old_size - 4096):
                    assert os.pread(f.fileno(), 4096, off) == bytes(4096), off
        m.stop()
