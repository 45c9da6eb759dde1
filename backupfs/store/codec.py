"""Block encoding: the hash that names a block, compression, and the record framing in packs.

Everything here is pure CPU work on bytes, safe to call from worker threads: BLAKE3, XXH3
and zstd release the GIL, so sealing and verifying blocks uses both cores.

A block is named by BLAKE3 (a cryptographic hash: dedup trusts it). Records written by
stores of format version 2 also carry an XXH3-128 checksum of the plaintext, which is
what a read checks (a tenth of BLAKE3's cost here); `full=True` checks BLAKE3 as well,
as `backupfs verify` does. The reasoning is in docs/architecture.md, "Checksums".
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import blake3
import xxhash
import zstandard

from ..errors import CorruptBlock
from .config import Compression

HASH_LEN = 32

CODEC_RAW = 0
CODEC_ZSTD = 1
# Added to a codec: the payload begins with CHECK_LEN bytes of XXH3-128 of the plaintext.
CHECKED = 2
CODEC_RAW_CHECKED = CODEC_RAW | CHECKED
CODEC_ZSTD_CHECKED = CODEC_ZSTD | CHECKED
CODECS = (CODEC_RAW, CODEC_ZSTD, CODEC_RAW_CHECKED, CODEC_ZSTD_CHECKED)
CHECK_LEN = 16

# Record header in a pack, before the stored bytes:
#   magic 'BK', codec u8, reserved u8, raw length u32, stored length u32, hash 32 bytes
RECORD_MAGIC = b"BK"
RECORD_HEADER = struct.Struct(">2sBBII32s")
RECORD_HEADER_LEN = RECORD_HEADER.size  # 44


def block_hash(data: bytes | memoryview) -> bytes:
    """The 32-byte BLAKE3 hash of a block's plaintext: its address in the store."""
    return blake3.blake3(data).digest()


def record_check(data: bytes | memoryview) -> bytes:
    """The 16-byte XXH3-128 checksum of a plaintext that a checked record carries."""
    return xxhash.xxh3_128_digest(data)


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # ZstdCompressor objects are not thread-safe: one per thread and level.
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


# Data that is compressed already (photos, video, archives) gains nothing from zstd,
# which still runs its whole match search over it: at level 1 or 3, half as long as
# text takes at level 1, for nothing (docs/performance.md). So a block of PROBE_MIN
# bytes or more is first judged by a sample, PROBE_PIECE bytes from its start, middle
# and end, compressed at level 1; a sample that does not shrink by at least
# 1/PROBE_GAIN stores the block raw at once. ZFS's zstd "early abort" and btrfs's
# compression heuristic make the same trade: a block that would have shrunk a little,
# or only where the sample missed, is kept whole.
PROBE_MIN = 32 * 1024
PROBE_PIECE = 1024
PROBE_GAIN = 32
PROBE_LEVEL = 1


def worth_compressing(data: bytes | memoryview) -> bool:
    """Whether a sample of the block shrinks enough under zstd to compress it all."""
    n = len(data)
    if n < PROBE_MIN:
        return True
    mid = n // 2
    sample = b"".join((data[:PROBE_PIECE], data[mid:mid + PROBE_PIECE], data[n - PROBE_PIECE:]))
    packed = _compressor(PROBE_LEVEL).compress(sample)
    return len(packed) <= len(sample) - len(sample) // PROBE_GAIN


def decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor: a ZstdDecompressor is not thread-safe."""
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


@dataclass(frozen=True, slots=True)
class EncodedBlock:
    """A block ready to append to a pack: its hash, codec and the bytes to store."""

    hash: bytes
    codec: int
    raw_len: int
    payload: bytes
    check: bytes = b""  # a checked codec's XXH3-128, stored before the payload

    @property
    def stored_len(self) -> int:
        return len(self.check) + len(self.payload)

    def record_parts(self) -> tuple[bytes, bytes]:
        """The record's header (with the checksum) and payload, to write one after the
        other: the payload, a block's worth, is not copied to put the checksum first."""
        header = RECORD_HEADER.pack(
            RECORD_MAGIC, self.codec, 0, self.raw_len, self.stored_len, self.hash
        )
        return header + self.check, self.payload


def encode(data: bytes | memoryview, compression: Compression,
           digest: bytes | None = None, checked: bool = False) -> EncodedBlock:
    """Hash (unless given) and compress one block; keep it raw when zstd does not shrink it
    (or a sample of it: worth_compressing).
    `checked`: the record carries the plaintext's XXH3-128 (format version 2).
    Bytes or a read-only view are used as they are (a raw payload is the view itself)."""
    if not (isinstance(data, bytes) or (isinstance(data, memoryview) and data.readonly)):
        data = bytes(data)  # a bytearray could change under a raw payload
    h = digest if digest is not None else block_hash(data)
    codec, payload = CODEC_RAW, data
    if compression.codec == "zstd" and data and worth_compressing(data):
        packed = _compressor(compression.level).compress(data)
        if len(packed) < len(data):
            codec, payload = CODEC_ZSTD, packed
    if checked:
        return EncodedBlock(h, codec | CHECKED, len(data), payload, record_check(data))
    return EncodedBlock(h, codec, len(data), payload)


def _checked_payload(record: bytes | memoryview, expected_hash: bytes, pack_id: int,
                     offset: int) -> tuple[int, int, bytes | None, memoryview]:
    """(codec, raw length, XXH3-128 checksum or None, stored bytes after it) of a record
    whose framing names `expected_hash`."""
    if len(record) < RECORD_HEADER_LEN:
        raise CorruptBlock(expected_hash, pack_id, offset, "record is cut short")
    magic, codec, _, raw_len, stored_len, h = RECORD_HEADER.unpack_from(record)
    if magic != RECORD_MAGIC:
        raise CorruptBlock(expected_hash, pack_id, offset, "bad record magic")
    if h != expected_hash:
        raise CorruptBlock(expected_hash, pack_id, offset, "record header names another block")
    payload = memoryview(record)[RECORD_HEADER_LEN:]
    if len(payload) != stored_len:
        raise CorruptBlock(expected_hash, pack_id, offset,
                           "stored length does not match the record")
    if codec not in CODECS:
        raise CorruptBlock(expected_hash, pack_id, offset, f"unknown codec {codec}")
    check = None
    if codec & CHECKED:
        if stored_len < CHECK_LEN:
            raise CorruptBlock(expected_hash, pack_id, offset, "record is cut short")
        check, payload = bytes(payload[:CHECK_LEN]), payload[CHECK_LEN:]
    return codec & ~CHECKED, raw_len, check, payload


def _verify(plain: bytes | memoryview, check: bytes | None, expected_hash: bytes,
            full: bool, pack_id: int, offset: int) -> None:
    """Raise CorruptBlock unless the plaintext matches its record's checksum and, where
    the record has none or `full` asks, its BLAKE3 address."""
    if check is not None and record_check(plain) != check:
        raise CorruptBlock(expected_hash, pack_id, offset, "checksum mismatch")
    if (check is None or full) and block_hash(plain) != expected_hash:
        raise CorruptBlock(expected_hash, pack_id, offset,
                           "checksum mismatch" if check is None else
                           "the plaintext is not the block its record names (BLAKE3)")


def decode_record(record: bytes, expected_hash: bytes, pack_id: int, offset: int,
                  full: bool = False) -> bytes:
    """Check a record read from a pack and return the block's plaintext.

    Raises CorruptBlock on any mismatch: framing, lengths, decompression or checksum.
    Never returns bytes that fail the record's checksum (XXH3-128, or BLAKE3 for a record
    without one); `full` also checks BLAKE3 against `expected_hash` (verify).
    """
    codec, raw_len, check, payload = _checked_payload(record, expected_hash, pack_id, offset)
    if codec == CODEC_RAW:
        data = bytes(payload)
    else:
        try:
            data = decompressor().decompress(payload, max_output_size=raw_len)
        except zstandard.ZstdError as e:
            raise CorruptBlock(expected_hash, pack_id, offset, f"zstd: {e}") from None
        except MemoryError:
            # What zstandard's one-shot decompress raises for a frame whose (damaged)
            # header asks for more memory than decoding may take; the output it would
            # allocate is at most raw_len, a block.
            raise CorruptBlock(expected_hash, pack_id, offset,
                               "zstd: the frame asks for more memory than allowed") from None
    if len(data) != raw_len:
        raise CorruptBlock(expected_hash, pack_id, offset, "checksum mismatch")
    _verify(data, check, expected_hash, full, pack_id, offset)
    return data


def decode_record_into(record: bytes | memoryview, expected_hash: bytes, dest: memoryview,
                       pack_id: int, offset: int) -> None:
    """`decode_record` writing the plaintext into `dest` (exactly the block's raw length)
    instead of new bytes. The checksum is checked over `dest` once written, so what the
    caller hands on from there is exactly what was verified."""
    codec, raw_len, check, payload = _checked_payload(record, expected_hash, pack_id, offset)
    if len(dest) != raw_len:
        raise CorruptBlock(expected_hash, pack_id, offset, "raw length differs from the index")
    if codec == CODEC_RAW:
        if len(payload) != raw_len:
            raise CorruptBlock(expected_hash, pack_id, offset, "checksum mismatch")
        dest[:] = payload
    else:
        try:
            got = decompressor().stream_reader(payload, read_across_frames=False).readinto(dest)
        except zstandard.ZstdError as e:
            raise CorruptBlock(expected_hash, pack_id, offset, f"zstd: {e}") from None
        if got != raw_len:
            raise CorruptBlock(expected_hash, pack_id, offset, "checksum mismatch")
    _verify(dest, check, expected_hash, False, pack_id, offset)


def parse_record_header(header: bytes) -> tuple[int, int, int, bytes] | None:
    """(codec, raw_len, stored_len, hash) of a record header, or None if it is not one."""
    if len(header) < RECORD_HEADER_LEN:
        return None
    magic, codec, _, raw_len, stored_len, h = RECORD_HEADER.unpack_from(header)
    if magic != RECORD_MAGIC:
        return None
    return codec, raw_len, stored_len, h
