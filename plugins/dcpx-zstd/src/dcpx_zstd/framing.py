"""The dcpx-native chunk format (descriptors with a ``group`` parameter).

A chunk starts with one kind byte::

    0x00  stored: the rest is the chunk, verbatim (it did not compress enough)
    0x01  planes: for each plane of the layout, one codec byte (0 stored, 1 zstd, 2 packed
          to 7 bits, see ``packing``) and the payload length (u64, little-endian); then
          the payloads in order; then the chunk's trailing bytes that do not fill a whole
          word, verbatim

The number of planes and each plane's raw length follow from the descriptor's layout and
the chunk size the checkpoint records, so a reader checks every length against them
before decoding anything.  zstd payloads are single frames that state their content size
and carry zstd's checksum.
"""

from __future__ import annotations

import struct
import numpy as np
import zstandard

import dcpx

from .codec import decompress_frame
from .grouping import Layout
from .packing import pack, packable, packed_size, unpack

STORED, PLANES = 0, 1
PLANE_STORED, PLANE_ZSTD, PLANE_PACK7 = 0, 1, 2
_PLANE = struct.Struct("<BQ")


def encode(data: memoryview, layout: Layout, cctx: zstandard.ZstdCompressor, threshold: float) -> bytes:
    """Frame one chunk.  Planes, and whole chunks, that do not shrink below ``threshold``
    times their size are stored as they are: reading them back is a copy, not a decode."""
    size = len(data)
    n, _ = layout.words(size)
    if n == 0:
        return b"".join((bytes([STORED]), data))
    planes, tail = layout.split(data)
    header = [bytes([PLANES])]
    payloads: list[object] = []
    total = 1 + len(tail)
    for k, plane in enumerate(planes):
        if k == layout.sign_plane and packed_size(n) < threshold * n and packable(plane):
            header.append(_PLANE.pack(PLANE_PACK7, packed_size(n)))
            payloads.append(pack(plane))
            total += _PLANE.size + len(payloads[-1])
            continue
        packed = cctx.compress(plane)
        if len(packed) < threshold * n:
            header.append(_PLANE.pack(PLANE_ZSTD, len(packed)))
            payloads.append(packed)
        else:
            header.append(_PLANE.pack(PLANE_STORED, n))
            payloads.append(plane)
        total += _PLANE.size + len(payloads[-1])
    if total >= threshold * size:
        return b"".join((bytes([STORED]), data))
    return b"".join((*header, *payloads, tail))


def decode(data: memoryview, layout: Layout, size: int, where: str,
           out: np.ndarray | None = None) -> bytes | bytearray | memoryview:
    """Undo ``encode``; the result has exactly ``size`` bytes or an error names ``where``.

    With ``out`` (uint8, ``size`` bytes) the chunk is written there, and only once every
    plane has decoded and passed its checks."""
    if len(data) < 1:
        raise dcpx.CheckpointFormatError(f"{where}: empty chunk (truncated?)")
    kind = data[0]
    if kind == STORED:
        if len(data) - 1 != size:
            raise dcpx.IntegrityError(f"{where}: stored chunk holds {len(data) - 1} bytes, expected {size}")
        if out is None:
            return bytes(data[1:])
        out[:] = np.frombuffer(data, dtype=np.uint8, offset=1)
        return memoryview(out)
    if kind != PLANES:
        raise dcpx.CheckpointFormatError(f"{where}: unknown chunk kind {kind} (corrupt, or written by a newer dcpx-zstd)")
    n, tail_len = layout.words(size)
    count = layout.planes
    pos = 1 + count * _PLANE.size
    if len(data) < pos:
        raise dcpx.CheckpointFormatError(f"{where}: chunk header cut short (truncated?)")
    entries = [_PLANE.unpack_from(data, 1 + k * _PLANE.size) for k in range(count)]
    if sum(length for _, length in entries) + pos + tail_len != len(data):
        raise dcpx.CheckpointFormatError(
            f"{where}: chunk is {len(data)} bytes but its header accounts for "
            f"{sum(length for _, length in entries) + pos + tail_len} (truncated or corrupt)"
        )
    planes: list[bytes | memoryview | np.ndarray] = []
    for k, (codec, length) in enumerate(entries):
        payload = data[pos:pos + length]
        pos += length
        if codec == PLANE_STORED:
            if length != n:
                raise dcpx.IntegrityError(f"{where}: stored plane {k} holds {length} bytes, expected {n}")
            planes.append(payload)
        elif codec == PLANE_ZSTD:
            planes.append(decompress_frame(payload, n, f"{where} plane {k}"))
        elif codec == PLANE_PACK7:
            if length != packed_size(n):
                raise dcpx.IntegrityError(f"{where}: packed plane {k} holds {length} bytes, expected {packed_size(n)}")
            plane = np.empty(n, dtype=np.uint8)
            unpack(np.frombuffer(payload, dtype=np.uint8), n, plane)
            planes.append(plane)
        else:
            raise dcpx.CheckpointFormatError(f"{where}: plane {k} has unknown codec {codec}")
    tail = data[pos:]
    if layout.width == 1 and out is None:
        plane = planes[0]
        return plane if isinstance(plane, bytes) else bytes(plane)
    if out is None:
        out = np.empty(size, dtype=np.uint8)
    layout.join(planes, tail, out)
    return memoryview(out)
