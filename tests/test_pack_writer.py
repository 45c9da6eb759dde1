"""The pack writer (O_DIRECT appends through staging buffers and a writing thread)
against a bytearray model.

What must hold whatever the sequence of appends, flushes, reads, reopenings and however
far the writing thread has got: a read returns exactly what was appended, staged, queued
or written; after a flush the file holds exactly the appended bytes and ends at their
length; a write the disk refuses loses nothing, and is retried by the next flush.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupfs.store import pack_writer
from backupfs.store.pack_writer import PAGE, PackWriter, StagePool
from backupfs.store.store import Store

STAGE = 3 * PAGE  # small, so that records cross pages and outgrow the stage


def o_direct_works(directory: Path) -> bool:
    probe = directory / "probe"
    probe.touch()
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


class Gate:
    """Holds the writing thread before each stage until the test lets one through."""

    def __init__(self):
        self.permits = threading.Semaphore(0)
        self.open = False

    def let_through(self, n: int = 1) -> None:
        for _ in range(n):
            self.permits.release()

    def open_wide(self) -> None:
        self.open = True
        self.permits.release()

    def wrap(self, write_stage):
        def gated(writer, item):
            if not self.open:
                self.permits.acquire()
                if self.open:
                    self.permits.release()  # pass the wake-up on to the next stage
            return write_stage(writer, item)
        return gated


def record(counter: int, size: int) -> bytes:
    return bytes((counter + i) % 251 for i in range(size))


def split(data: bytes, nparts: int) -> tuple[bytes, ...]:
    cut = [len(data) * i // nparts for i in range(nparts + 1)]
    return tuple(data[a:b] for a, b in zip(cut, cut[1:]))


def read(writer: PackWriter, path: Path, offset: int, length: int) -> bytes:
    """What PackSet.read does: the writer's memory if it has some of the bytes, else the file."""
    staged = writer.read_staged(offset, length)
    if staged is not None:
        return bytes(staged)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 4 * STAGE), st.integers(1, 3)),
        st.tuples(st.just("flush")),
        st.tuples(st.just("start_flush")),
        st.tuples(st.just("let_through"), st.integers(1, 3)),
        st.tuples(st.just("read"), st.floats(0, 1), st.floats(0, 1)),
        st.tuples(st.just("reopen")),
    ),
    max_size=30,
)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, seed=st.integers(0, 2**16))
def test_reads_and_the_flushed_file_match_what_was_appended(direct, ops, seed, monkeypatch):
    gate = Gate()
    with monkeypatch.context() as mp, tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        mp.setattr(PackWriter, "_write_stage", gate.wrap(PackWriter._write_stage))
        mp.setattr(pack_writer, "MAX_QUEUED", 1000)  # a held thread must not stop appends
        d = Path(d)
        path = d / "000001.pack"
        path.write_bytes(b"HEADER")
        model = bytearray(path.read_bytes())
        writer = PackWriter(path, len(model), direct=direct, pool=StagePool(STAGE))
        assert writer.direct == (direct and o_direct_works(d))
        counter = seed
        try:
            for op in ops:
                if op[0] == "append":
                    _, size, nparts = op
                    data = record(counter, size)
                    counter += 1
                    assert writer.append(split(data, nparts), size) == len(model)
                    model += data
                elif op[0] == "flush":
                    gate.open_wide()
                    writer.flush()
                    gate.open = False
                    assert path.read_bytes() == model
                elif op[0] == "start_flush":
                    writer.start_flush()
                    # The file ends at its length, even while whole pages are queued.
                    assert path.stat().st_size == len(model)
                elif op[0] == "let_through":
                    gate.let_through(op[1])
                elif op[0] == "read":
                    a, b = sorted((int(op[1] * len(model)), int(op[2] * len(model))))
                    assert read(writer, path, a, b - a + 1) == bytes(model[a:b + 1])
                elif op[0] == "reopen":
                    gate.open_wide()
                    writer.close()
                    gate.open = False
                    assert path.read_bytes() == model
                    writer = PackWriter(path, len(model), direct=direct, pool=StagePool(STAGE))
                assert writer.length == len(model)
            gate.open_wide()
            writer.flush()
            assert path.read_bytes() == model
            assert read(writer, path, 0, len(model)) == bytes(model)
        finally:
            gate.open_wide()
            writer.close(keep_staged=False)


@pytest.fixture
def refused_writes(monkeypatch) -> list[OSError]:
    """Errors the writing thread's next stage writes fail with, one each."""
    failures: list[OSError] = []
    write_stage = PackWriter._write_stage

    def failing(writer, item):
        if failures:
            raise failures.pop()
        return write_stage(writer, item)

    monkeypatch.setattr(PackWriter, "_write_stage", failing)
    return failures


def test_a_refused_write_is_reported_by_the_flush_and_retried_by_the_next(tmp_path,
                                                                          refused_writes):
    refused_writes.append(OSError(errno.ENOSPC, "No space left on device"))
    path = tmp_path / "000001.pack"
    path.write_bytes(b"HEADER")
    writer = PackWriter(path, 6, pool=StagePool(STAGE))
    if not writer.direct:
        pytest.skip("O_DIRECT is refused here")
    data = record(7, 5 * PAGE + 100)
    writer.append((data,), len(data))
    with pytest.raises(OSError) as ei:
        writer.flush()
    assert ei.value.errno == errno.ENOSPC
    # Nothing is lost meanwhile: the refused stage is still read from memory.
    assert read(writer, path, 6, len(data)) == data
    writer.flush()
    assert path.read_bytes() == b"HEADER" + data
    writer.close()


def test_a_store_whose_pack_write_fails_commits_nothing_until_it_succeeds(tmp_path,
                                                                          refused_writes):
    """The index must never record a pack length whose bytes the disk refused."""
    Store.init(tmp_path / "s")
    blocks = [os.urandom(100_000) for _ in range(40)]  # random: stored raw, 4 MB
    with Store.open(tmp_path / "s") as s:
        first = s.blocks.put(b"committed before the failure")
        s.commit()
        refused_writes.append(OSError(errno.EIO, "Input/output error"))
        hashes = [s.blocks.put(b) for b in blocks]
        with pytest.raises(OSError):
            s.commit()
        assert [s.blocks.get(h) for h in hashes] == blocks  # still served from memory
        s.commit()  # the retry
    with Store.open(tmp_path / "s") as s:
        assert s.blocks.get(first) == b"committed before the failure"
        assert [s.blocks.get(h) for h in hashes] == blocks


def test_where_o_direct_is_refused_appends_go_through_the_page_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(pack_writer, "open_direct", lambda path: None)
    path = tmp_path / "000001.pack"
    path.write_bytes(b"HEADER")
    writer = PackWriter(path, 6, pool=StagePool(STAGE))
    assert not writer.direct
    data = record(3, 2 * STAGE)
    writer.append((data,), len(data))
    assert writer.read_staged(0, 10) is None
    assert path.read_bytes() == b"HEADER" + data  # in the file at once, no flush needed
    writer.close()


def test_a_full_disk_refuses_the_record_at_append_not_later_in_the_thread(tmp_path,
                                                                          monkeypatch):
    """The disk's blocks are reserved a stage ahead, so ENOSPC comes from `append` (the
    record is not taken, nothing is lost) and never from the thread's later write, when
    the record would already be counted and indexed."""
    path = tmp_path / "000001.pack"
    path.write_bytes(b"HEADER")
    writer = PackWriter(path, 6, pool=StagePool(STAGE))
    if not writer.direct or pack_writer.reserve_space is None:
        pytest.skip("O_DIRECT or fallocate is refused here")
    reserve = pack_writer.reserve_space
    disk_full = [False]

    def reserve_unless_full(fd, offset, n):
        if disk_full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        reserve(fd, offset, n)

    monkeypatch.setattr(pack_writer, "reserve_space", reserve_unless_full)
    model = bytearray(b"HEADER")
    first = record(1, STAGE // 2)
    writer.append((first,), len(first))  # within the first stage's reservation
    model += first
    disk_full[0] = True
    second = record(2, STAGE)  # needs the next stage's blocks
    with pytest.raises(OSError) as ei:
        writer.append((second,), len(second))
    assert ei.value.errno == errno.ENOSPC
    assert writer.length == len(model)
    writer.flush()
    assert path.read_bytes() == model
    disk_full[0] = False
    writer.append((second,), len(second))
    model += second
    writer.close()
    assert path.read_bytes() == model
    # Closing gave back what was reserved past the end.
    assert path.stat().st_blocks * 512 < len(model) + 2 * PAGE


def test_blocks_a_stopped_writer_reserved_are_given_back_when_the_store_opens(tmp_path):
    Store.init(tmp_path / "s")
    s = Store.open(tmp_path / "s")
    data = os.urandom(100_000)
    h = s.blocks.put(data)
    s.commit()
    [path] = (tmp_path / "s" / "packs").glob("*/*.pack")
    reserved = path.stat().st_blocks * 512
    if reserved < pack_writer.STAGE_SIZE:
        pytest.skip("this filesystem reserves nothing ahead")
    # The writer stops without closing (a crash): its reservation stays with the file.
    s.env.close()
    os.close(s._lock_fd)
    with Store.open(tmp_path / "s") as s2:
        assert path.stat().st_blocks * 512 < 200_000
        assert s2.blocks.get(h) == data
