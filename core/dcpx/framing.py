"""The on-disk framing of one dcpx item.

An item written with transforms is a sequence of independently decodable chunks followed by
an index and a fixed footer, so a reader finds the chunk table from the item's end, can
decode chunks in parallel and can decode only the chunks a partial read overlaps::

    chunk 0 | chunk 1 | ... | index | footer
    footer = magic "DCPXFRM1", index length (u64), CRC-32 of the index (u32), 4 zero bytes
    index  = raw size (u64), chunk size (u64), chunk count (u32), layer count (u16), 2 zero
             bytes, then per chunk one u64 per layer: the chunk's size after each transform

All integers are little-endian.  The sizes after each layer let every ``decode`` be told
the exact length it must produce, which bounds memory on hostile input.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from .errors import CheckpointFormatError

FRAME_DESCRIPTOR = "frame@dcpx/1"
RAW_DESCRIPTOR = "raw@dcpx/1"
MARKERS = (FRAME_DESCRIPTOR, RAW_DESCRIPTOR)

FOOTER = struct.Struct("<8sQI4s")
HEADER = struct.Struct("<QQIH2s")
_PAD4, _PAD2 = bytes(4), bytes(2)
MAGIC = b"DCPXFRM1"
MAX_CHUNK_SIZE = 1 << 30
# A layer may legitimately grow a chunk a little (headers, tags, a raw-stored flag); a
# recorded size beyond this slack is treated as forged before anything is allocated.
LAYER_SLACK = 1 << 20


@dataclass(frozen=True)
class FrameIndex:
    raw_size: int
    chunk_size: int
    layers: int
    layer_sizes: tuple[tuple[int, ...], ...]  # per chunk: size after layer 1..n

    @property
    def count(self) -> int:
        return len(self.layer_sizes)

    def raw_span(self, k: int) -> tuple[int, int]:
        start = k * self.chunk_size
        return start, min(self.raw_size, start + self.chunk_size)

    def stored_offsets(self) -> list[int]:
        offsets, pos = [], 0
        for sizes in self.layer_sizes:
            offsets.append(pos)
            pos += sizes[-1]
        return offsets

    def encode(self) -> bytes:
        body = HEADER.pack(self.raw_size, self.chunk_size, self.count, self.layers, _PAD2)
        body += b"".join(struct.pack(f"<{self.layers}Q", *sizes) for sizes in self.layer_sizes)
        return body + FOOTER.pack(MAGIC, len(body), zlib.crc32(body), _PAD4)


def chunk_count(raw_size: int, chunk_size: int) -> int:
    return -(-raw_size // chunk_size)


def parse_footer(footer: bytes, item_length: int, where: str) -> int:
    """Return the index length recorded in an item's footer, after checking it."""
    if item_length < FOOTER.size or len(footer) != FOOTER.size:
        raise CheckpointFormatError(f"{where}: item of {item_length} bytes is too short for a dcpx frame")
    magic, index_len, _crc, pad = FOOTER.unpack(footer)
    if magic != MAGIC or pad != _PAD4:
        raise CheckpointFormatError(f"{where}: frame footer is corrupted (magic {magic!r}, reserved {pad!r})")
    if index_len < HEADER.size or index_len > item_length - FOOTER.size:
        raise CheckpointFormatError(f"{where}: frame index length {index_len} does not fit the item")
    return index_len


def parse_index(
    footer: bytes, body: bytes, item_length: int, layers: int, where: str, expected_raw: int | None, max_raw: int
) -> FrameIndex:
    """Parse and validate an index read from untrusted bytes."""
    _magic, index_len, crc, _pad = FOOTER.unpack(footer)
    if len(body) != index_len or zlib.crc32(body) != crc:
        raise CheckpointFormatError(f"{where}: frame index is corrupted (CRC mismatch)")
    raw_size, chunk_size, count, n_layers, pad = HEADER.unpack_from(body)
    if pad != _PAD2:
        raise CheckpointFormatError(f"{where}: frame index header has non-zero reserved bytes (corrupt, or a newer format)")
    if n_layers != layers:
        raise CheckpointFormatError(f"{where}: frame has {n_layers} layers but metadata lists {layers} transforms")
    if expected_raw is not None and raw_size != expected_raw:
        raise CheckpointFormatError(f"{where}: frame holds {raw_size} raw bytes, the checkpoint records {expected_raw}")
    if raw_size > max_raw:
        raise CheckpointFormatError(f"{where}: frame claims {raw_size} raw bytes, more than the limit {max_raw}")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE or count != chunk_count(raw_size, chunk_size):
        raise CheckpointFormatError(f"{where}: frame chunk table is inconsistent ({count} chunks of {chunk_size})")
    if index_len != HEADER.size + count * layers * 8:
        raise CheckpointFormatError(f"{where}: frame index length {index_len} does not match {count} chunks")
    flat = struct.unpack_from(f"<{count * layers}Q", body, HEADER.size)
    sizes = tuple(tuple(flat[k * layers:(k + 1) * layers]) for k in range(count))
    index = FrameIndex(raw_size, chunk_size, layers, sizes)
    for k, chunk_sizes in enumerate(sizes):
        start, end = index.raw_span(k)
        bound = 2 * (end - start) + LAYER_SLACK
        if any(s > bound for s in chunk_sizes):
            raise CheckpointFormatError(f"{where}: chunk {k} records an implausible size {max(chunk_sizes)}")
    stored = sum(s[-1] for s in sizes) if layers else raw_size
    if stored + index_len + FOOTER.size != item_length:
        raise CheckpointFormatError(
            f"{where}: chunks ({stored} bytes) plus index do not add up to the item length {item_length}"
        )
    return index
