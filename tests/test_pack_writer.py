"""The pack writer (O_DIRECT appends through a staging buffer) against a bytearray model.

What must hold whatever the sequence of appends, flushes, reads and reopenings: a read
returns exactly what was appended, staged or not; after a flush the file holds exactly
the appended bytes and ends at their length; a write the disk refuses appends nothing
and loses nothing.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupfs.store import pack_writer
from backupfs.store.pack_writer import PAGE, PackWriter

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


def new_pack(directory: Path, head: bytes = b"HEADER") -> Path:
    path = directory / "000001.pack"
    path.write_bytes(head)
    return path


def read(writer: PackWriter, path: Path, offset: int, length: int) -> bytes:
    """What PackSet.read does: the writer's stage if it has the bytes, else the file."""
    staged = writer.read_staged(offset, length)
    if staged is not None:
        return staged
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 4 * STAGE), st.integers(1, 3)),
        st.tuples(st.just("flush")),
        st.tuples(st.just("read"), st.floats(0, 1), st.floats(0, 1)),
        st.tuples(st.just("reopen")),
    ),
    max_size=30,
)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, seed=st.integers(0, 2**16))
def test_reads_and_the_flushed_file_match_what_was_appended(direct, ops, seed):
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        d = Path(d)
        path = new_pack(d)
        model = bytearray(path.read_bytes())
        writer = PackWriter(path, len(model), direct=direct, stage_size=STAGE)
        assert writer.direct == (direct and o_direct_works(d))
        counter = seed
        try:
            for op in ops:
                if op[0] == "append":
                    _, size, nparts = op
                    record = bytes((counter + i) % 251 for i in range(size))
                    counter += 1
                    cut = [size * k // nparts for k in range(nparts + 1)]
                    parts = tuple(record[a:b] for a, b in zip(cut, cut[1:]))
                    assert writer.append(parts, size) == len(model)
                    model += record
                elif op[0] == "flush":
                    writer.flush()
                    assert path.read_bytes() == model
                elif op[0] == "read":
                    offset = int(op[1] * len(model))
                    length = int(op[2] * (len(model) - offset))
                    assert read(writer, path, offset, length) == model[offset:offset + length]
                else:  # reopen: the store closed and opened again, the pack continued
                    writer.close()
                    writer = PackWriter(path, len(model), direct=direct, stage_size=STAGE)
                assert writer.length == len(model)
            writer.close()
            assert path.read_bytes() == model
        finally:
            writer.close(keep_staged=False)


def test_a_direct_write_the_disk_refuses_appends_nothing_and_loses_nothing(tmp_path, monkeypatch):
    path = new_pack(tmp_path)
    writer = PackWriter(path, 6, stage_size=STAGE)
    if not writer.direct:
        pytest.skip("O_DIRECT is not available on this filesystem")
    first = os.urandom(STAGE - 100)
    writer.append((first,), len(first))
    real_pwrite = os.pwrite

    def full_disk(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pack_writer.os, "pwrite", full_disk)
    second = os.urandom(1000)
    with pytest.raises(OSError) as ei:
        writer.append((second,), len(second))  # needs room: the stage must be written
    assert ei.value.errno == errno.ENOSPC
    assert writer.length == 6 + len(first)
    with pytest.raises(OSError):
        writer.close()  # refused too: the writer stays open with its stage
    assert read(writer, path, 6, len(first)) == first

    monkeypatch.setattr(pack_writer.os, "pwrite", real_pwrite)
    writer.append((second,), len(second))
    writer.close()
    assert path.read_bytes() == b"HEADER" + first + second


def test_a_record_larger_than_the_stage_is_staged_whole(tmp_path):
    path = new_pack(tmp_path)
    writer = PackWriter(path, 6, stage_size=STAGE)
    big = os.urandom(5 * STAGE + 123)
    assert writer.append((big[:10], big[10:]), len(big)) == 6
    assert read(writer, path, 6, len(big)) == big
    writer.close()
    assert path.read_bytes() == b"HEADER" + big


def test_without_o_direct_the_writer_appends_through_the_page_cache(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(pack_writer.os, "open", no_direct)
    path = new_pack(tmp_path)
    writer = PackWriter(path, 6)
    assert not writer.direct
    writer.append((b"abc", b"def"), 6)
    assert path.read_bytes() == b"HEADERabcdef"  # written at once, no stage
    assert writer.read_staged(6, 6) is None
    writer.close()


def test_a_discarded_writer_writes_nothing_more(tmp_path):
    path = new_pack(tmp_path)
    writer = PackWriter(path, 6, stage_size=STAGE)
    writer.append((b"x" * 100,), 100)
    staged = writer.direct  # buffered appends are in the file at once
    writer.close(keep_staged=False)
    assert path.read_bytes() == (b"HEADER" if staged else b"HEADER" + b"x" * 100)
