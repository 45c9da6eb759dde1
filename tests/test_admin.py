"""fsck, verify, stats and compact, on stores built through the namespace and on a mount."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading

import pytest

from backupfs.namespace import ROOT_INO, Namespace
from backupfs.namespace.records import U64, entry_prefix
from backupfs.store import Store, codec
from mounting import backupfs

BS = 4096


def build_store(path, files: dict[bytes, bytes], snapshots=2):
    """A store with `files` at the root, changed between `snapshots` snapshots.
    Returns {view name: {file name: content}}."""
    backupfs("init", path, "--block-size", "4K")
    store = Store.open(path)
    ns = Namespace(store)
    live, now = ns.live, 10**18
    seen = {}
    for round_ in range(snapshots + 1):
        for name, data in files.items():
            data = data if round_ == 0 else data[:BS] + b"round %d" % round_
            ino = live.child(ROOT_INO, name)
            if ino is None:
                ino = live.create(ROOT_INO, name, stat.S_IFREG | 0o644, 0, 0, now).ino
            for n in range(0, -(-len(data) // BS)):
                live.write_block(ino, n, store.blocks.put(data[n * BS:(n + 1) * BS]))
            live.setattr(ino, size=len(data))
            seen.setdefault("live", {})[name] = data
        if round_ < snapshots:
            r = ns.snapshot(now_ns=(1_700_000_000 + round_) * 10**9)
            seen[r.name] = dict(seen["live"])
    store.close()
    return seen


def fsck(path, *args, check=False):
    r = backupfs("fsck", path, "--json", *args, check=check)
    return r.returncode, json.loads(r.stdout)


def kinds(report, key="problems"):
    return sorted({p["kind"] for p in report[key]})


def test_fsck_clean_store_reports_nothing(tmp_path):
    build_store(tmp_path / "s", {b"a": os.urandom(3 * BS), b"b": b"text" * 3000})
    code, report = fsck(tmp_path / "s")
    assert code == 0 and report["problems"] == []
    assert report["checked"]["blocks"] > 0


def test_fsck_finds_and_repairs_index_damage(tmp_path):
    path = tmp_path / "s"
    build_store(path, {b"a": os.urandom(3 * BS), b"b": os.urandom(2 * BS)})
    with Store.open(path) as store:
        ns = Namespace(store)
        # refcount off by one
        h = ns.live.block_hash(ns.live.child(ROOT_INO, b"a"), 0)
        store.blocks.incref(h)
        # a dangling entry: names an inode that never existed
        ns.entries.write(entry_prefix(ROOT_INO, b"ghost"), U64.pack(999_999))
        # a lost inode: link count 1, no name
        lost = ns.live.create(ROOT_INO, b"lost", stat.S_IFREG | 0o644, 0, 0, 1).ino
        ns.entries.write(entry_prefix(ROOT_INO, b"lost"), None)
        # an orphan record for a file that is named
        ns.orphan_set.add(ns.live.child(ROOT_INO, b"b"))
    code, report = fsck(path)
    assert code == 1
    assert kinds(report) == ["dangling-entry", "lost-inode", "orphan", "refcount"]
    code, report = fsck(path, "--repair")
    assert code == 0 and report["not_repaired"] == []
    code, report = fsck(path)
    assert code == 0 and report["problems"] == [], report
    with Store.open(path, readonly=True) as store:
        ns = Namespace(store)
        lf = ns.live.lookup(ROOT_INO, b"lost+found")
        assert ns.live.lookup(lf.ino, b"#%d" % lost).nlink == 1
        with pytest.raises(OSError):
            ns.live.lookup(ROOT_INO, b"ghost")


def test_fsck_reports_a_truncated_pack_as_not_repairable(tmp_path):
    path = tmp_path / "s"
    build_store(path, {b"a": os.urandom(5 * BS)})
    pack = next((path / "packs").rglob("*.pack"))
    os.truncate(pack, pack.stat().st_size - 100)
    code, report = fsck(path, "--repair")
    assert code == 1
    assert "pack-truncated" in kinds(report, "not_repaired")


def test_verify_names_every_file_and_snapshot_using_a_bad_block(tmp_path):
    path = tmp_path / "s"
    seen = build_store(path, {b"keep": os.urandom(2 * BS), b"hurt": os.urandom(2 * BS)})
    with Store.open(path, readonly=True) as store:
        ns = Namespace(store)
        # block 1 of `hurt` is the same in the first snapshot only; block 0 everywhere
        h0 = ns.live.block_hash(ns.live.child(ROOT_INO, b"hurt"), 0)
        loc = store.blocks.locate(h0)
        pack = store.packs.path(loc.pack_id)
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.record_len - 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x55]))
    r = backupfs("verify", path, "--json", check=False)
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["finished"] and [b["hash"] for b in out["bad"]] == [h0.hex()]
    users = sorted(out["bad"][0]["used_by"])
    assert users == sorted([f"live: /hurt"] + [f"snapshot {n}: /hurt" for n in seen if n != "live"])
    # The human form says the same, and the state is not left behind.
    r = backupfs("verify", path, check=False)
    snaps = ", ".join(n for n in seen if n != "live")
    assert r.returncode == 1 and "BAD block" in r.stdout
    assert f"    /hurt: live and snapshots {snaps}\n" in r.stdout, r.stdout
    assert not (path / "verify-state.json").exists()


def test_verify_finds_a_forged_record(tmp_path):
    """A record rewritten whole, other bytes with their own XXH3, passes a read (a
    checksum guards against damage, not forgery); verify checks BLAKE3 too."""
    path = tmp_path / "s"
    build_store(path, {b"f": os.urandom(BS)}, snapshots=0)
    with Store.open(path, readonly=True) as store:
        ns = Namespace(store)
        h = ns.live.block_hash(ns.live.child(ROOT_INO, b"f"), 0)
        loc = store.blocks.locate(h)
        pack = store.packs.path(loc.pack_id)
        forgery = os.urandom(BS)
        forged = codec.encode(forgery, store.config.compression, digest=h, checked=True)
    assert forged.stored_len == loc.stored_len
    with open(pack, "r+b") as f:
        f.seek(loc.offset)
        f.write(b"".join(forged.record_parts()))
    with Store.open(path, readonly=True) as store:
        assert store.blocks.get(h) == forgery
    r = backupfs("verify", path, "--json", check=False)
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert [b["hash"] for b in out["bad"]] == [h.hex()]
    assert "BLAKE3" in out["bad"][0]["reason"] and out["bad"][0]["used_by"] == ["live: /f"]


def test_verify_prints_a_bad_blocks_uses_a_line_per_path():
    from backupfs.cli.admin_cmds import _uses_by_path
    year = [f"snapshot 2026-{m:02d}-01T000000Z" for m in range(1, 13)]
    uses = [f"{w}: /old" for w in year] + ["live: /old", "snapshot 2026-12-01T000000Z: /x y",
                                             "live: /a: b"]
    assert _uses_by_path(uses) == [
        "/old: live and 12 snapshots, 2026-01-01T000000Z to 2026-12-01T000000Z",
        "/x y: snapshot 2026-12-01T000000Z",
        "/a: b: live"]
    assert _uses_by_path([f"{w}: /f" for w in year[:3]]) == [
        "/f: snapshots 2026-01-01T000000Z, 2026-02-01T000000Z, 2026-03-01T000000Z"]


def test_verify_resumes_after_max_duration(tmp_path):
    path = tmp_path / "s"
    build_store(path, {b"f%d" % i: os.urandom(8 * BS) for i in range(40)}, snapshots=0)
    r = backupfs("verify", path, "--json", "--max-duration", "0", check=False)
    assert r.returncode == 2
    first = json.loads(r.stdout)
    assert not first["finished"] and 0 < first["checked"] < 320
    r = backupfs("verify", path, "--json")
    second = json.loads(r.stdout)
    assert second["finished"] and second["checked"] == 320 and second["bad"] == []


def test_stats_count_a_hard_linked_file_once(tmp_path):
    path = tmp_path / "s"
    build_store(path, {b"big": os.urandom(3 * BS)}, snapshots=0)
    with Store.open(path) as store:
        ns = Namespace(store)
        ns.live.link(ns.live.child(ROOT_INO, b"big"), ROOT_INO, b"big-again", 10**18)
    st = json.loads(backupfs("stats", path, "--json").stdout)
    assert st["live"] == {"files": 1, "logical_bytes": 3 * BS, "referenced_bytes": 3 * BS}
    assert st["dedup_ratio"] == 1.0


def test_stats_match_sizes_computed_independently(tmp_path):
    path = tmp_path / "s"
    rnd, text = os.urandom(3 * BS), b"compressible " * 1000
    seen = build_store(path, {b"rnd": rnd, b"text": text}, snapshots=2)
    r = backupfs("stats", path, "--json")
    st = json.loads(r.stdout)
    assert st["live"]["logical_bytes"] == sum(len(d) for d in seen["live"].values())
    assert st["live"]["files"] == 2
    for snap in st["snapshots"]:
        assert snap["logical_bytes"] == sum(len(d) for d in seen[snap["name"]].values())
    # Compressible text makes stored < raw; random data does not shrink.
    assert st["stored_bytes"] < st["raw_bytes"] and st["compression_ratio"] > 1
    # The first snapshot alone holds the tails of both files (blocks 1.. of round 0);
    # deleting it must free exactly the unique bytes stats promised.
    first = st["snapshots"][0]
    assert first["unique_bytes"] > 0
    with Store.open(path) as store:
        ns = Namespace(store)
        before = sum(l.record_len for l in store.blocks.iter_locations() if l.refcount)
        ns.delete_snapshot(ns.find_snapshot(first["name"]).id)
        after = sum(l.record_len for l in store.blocks.iter_locations() if l.refcount)
    assert before - after == first["unique_bytes"]


@pytest.mark.mount
@pytest.mark.timeout(180)
def test_compact_under_a_running_mount(mount_factory):
    m = mount_factory("c", init_args=("--block-size", "4K")).start()
    keep = {f"keep{i}": os.urandom(300_000) for i in range(4)}
    for name, data in keep.items():
        (m.path / name).write_bytes(data)
    for i in range(80):  # garbage, written then deleted: more than a pack (64 MiB)
        (m.path / f"junk{i}").write_bytes(os.urandom(1_000_000))
    m.syncfs()
    for i in range(80):
        (m.path / f"junk{i}").unlink()
    backupfs("snapshot", m.path)
    before = json.loads(backupfs("stats", m.path, "--json", "--quick").stdout)
    assert before["dead_bytes"] > 60_000_000
    failures, stop = [], threading.Event()
    written = [0]  # bytes the writer below stored meanwhile, which compaction cannot free

    def reader():
        while not stop.is_set():
            for name, data in keep.items():
                try:
                    if (m.path / name).read_bytes() != data:
                        failures.append(f"{name}: wrong bytes")
                except OSError as e:
                    failures.append(f"{name}: {e}")

    def writer():
        i = 0
        while not stop.is_set():
            (m.path / f"new{i % 5}").write_bytes(os.urandom(100_000))
            written[0] += 100_000
            i += 1

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    try:
        r = json.loads(backupfs("compact", m.path, "--json", "--threshold", "0.3").stdout)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert r["packs_rewritten"] > 0 and r["bytes_freed"] > 50_000_000
    after = json.loads(backupfs("stats", m.path, "--json", "--quick").stdout)
    # Each 4 KiB block costs its record header too: 2% covers that.
    assert after["pack_bytes"] < before["pack_bytes"] - 50_000_000 + written[0] * 1.02
    m.stop()
    code, report = fsck(m.store)
    assert code == 0, report
    m.start()
    for name, data in keep.items():
        assert (m.path / name).read_bytes() == data


@pytest.mark.mount
@pytest.mark.timeout(120)
def test_verify_and_stats_on_a_running_mount(mounted):
    (mounted.path / "a").write_bytes(os.urandom(500_000))
    (mounted.path / "b").write_bytes(b"text " * 100_000)
    backupfs("snapshot", mounted.path)
    (mounted.path / "a").write_bytes(os.urandom(500_000))   # not yet committed: verify
    r = json.loads(backupfs("verify", mounted.path, "--json").stdout)  # must see it
    assert r["finished"] and r["bad"] == [] and r["checked"] >= 12
    st = json.loads(backupfs("stats", mounted.path, "--json").stdout)
    assert st["live"]["logical_bytes"] == 1_000_000
    assert st["snapshots"][0]["logical_bytes"] == 1_000_000
    assert st["snapshots"][0]["unique_bytes"] > 400_000   # the first `a` only it keeps
    assert st["daemon"]["checksum_errors"] == 0
    # The mount kept serving throughout.
    assert (mounted.path / "b").read_bytes() == b"text " * 100_000


def test_stats_shows_its_walk_of_the_views(tmp_path, capsys):
    """A walk of every snapshot can take long: a bar counts the views (when asked, or on
    a terminal), and nothing is shown in a script."""
    from backupfs.admin.stats import store_stats

    path = tmp_path / "s"
    build_store(path, {b"f": os.urandom(2 * BS)}, snapshots=3)
    with Store.open(path, readonly=True) as store:
        ns = Namespace(store)
        store_stats(store, ns, show_progress=True)
        shown = capsys.readouterr().err
        assert "stats:" in shown and "/4.00" in shown and "view/s" in shown  # 4 views
        store_stats(store, ns)  # not a terminal here: silent
        assert capsys.readouterr().err == ""
