"""7-bit packing of a byte plane whose bit 0 is clear everywhere.

The float layouts' sign plane holds six mantissa bits, the sign and, in bit 0, the
exponent's top bit, which is 0 for every value below 2 in magnitude.  The other seven bits
are close to uniformly random, so an entropy coder could win at most the constant bit,
1/8 of the plane, and decoding Huffman is the slowest step of a read.  Packing wins exactly
that 1/8 with a few whole-array operations.

Format for a plane of ``n`` bytes, with ``q = 8 * (n // 64)``: the first ``8q`` bytes are
eight contiguous segments ``S0..S7`` of ``q`` bytes; the packed form is ``P0..P6`` with
``P_j = S_j | (bit j+1 of S7)`` byte by byte, followed by the last ``n - 8q`` bytes (fewer
than 64) verbatim.  Segments are whole 64-bit words, so the work runs eight bytes per
numpy element.  The compiled kernels (see ``kernels``) compute the same bytes when built.
"""

from __future__ import annotations

import numpy as np

from . import kernels

# Packing costs a few dozen numpy calls whatever the plane's size; below this size zstd's
# Huffman stage gets the same 1/8 for less.
MIN_PLANE = 1 << 14
# 64-bit words per pass: bounds the scratch array; planes of 4 MiB chunks take one pass,
# since here numpy's per-call cost outweighs what smaller, cache-resident blocks gain.
BLOCK = 1 << 16
_LOW_BITS = np.uint64(0x0101010101010101)
_HIGH_BITS = np.uint64(0xFEFEFEFEFEFEFEFE)


def _segment(n: int) -> int:
    return 8 * (n // 64)


def packed_size(n: int) -> int:
    q = _segment(n)
    return 7 * q + (n - 8 * q)


def packable(plane: np.ndarray) -> bool:
    """True if the plane is worth packing and bit 0 of every byte is clear."""
    return plane.size >= MIN_PLANE and not int(np.bitwise_or.reduce(plane)) & 1


def pack(plane: np.ndarray, compiled: bool | None = None) -> np.ndarray:
    """Pack a uint8 plane whose bit 0 is clear everywhere (see ``packable``)."""
    n = plane.size
    out = np.empty(packed_size(n), dtype=np.uint8)
    if kernels.use_compiled(compiled):
        kernels.native.pack7(plane, out)
        return out
    q = _segment(n)
    segments = _words(plane[: 8 * q]).reshape(8, q // 8)
    body = out[: 7 * q].view(np.uint64).reshape(7, q // 8)
    spare = np.empty(min(q // 8, BLOCK), dtype=np.uint64)
    for start in range(0, q // 8, BLOCK):
        cols = slice(start, min(start + BLOCK, q // 8))
        last, tmp = segments[7, cols], spare[: cols.stop - start]
        for j in range(7):
            np.right_shift(last, j + 1, out=tmp)
            np.bitwise_and(tmp, _LOW_BITS, out=tmp)
            np.bitwise_or(segments[j, cols], tmp, out=body[j, cols])
    out[7 * q:] = plane[8 * q:]
    return out


def unpack(packed: np.ndarray, n: int, out: np.ndarray, compiled: bool | None = None) -> None:
    """Inverse of ``pack`` into ``out`` (uint8, ``n`` bytes); ``packed`` must be
    ``packed_size(n)`` bytes (the caller checks)."""
    if kernels.use_compiled(compiled):
        kernels.native.unpack7(packed, out[:n])
        return
    q = _segment(n)
    body = _words(packed[: 7 * q]).reshape(7, q // 8)
    segments = out[: 8 * q].view(np.uint64).reshape(8, q // 8)
    spare = np.empty(min(q // 8, BLOCK), dtype=np.uint64)
    for start in range(0, q // 8, BLOCK):
        cols = slice(start, min(start + BLOCK, q // 8))
        last, tmp = segments[7, cols], spare[: cols.stop - start]
        last[:] = 0
        for j in range(7):
            src = body[j, cols]
            np.bitwise_and(src, _HIGH_BITS, out=segments[j, cols])
            np.bitwise_and(src, _LOW_BITS, out=tmp)
            np.left_shift(tmp, j + 1, out=tmp)
            np.bitwise_or(last, tmp, out=last)
    out[8 * q:] = packed[7 * q:]


def _words(data: np.ndarray) -> np.ndarray:
    """``data`` (uint8, a multiple of 8 bytes) as 64-bit words, copied if misaligned:
    payloads sit at arbitrary offsets in a chunk, and numpy is slow on unaligned words."""
    if data.ctypes.data % 8:
        data = data.copy()
    return data.view(np.uint64)
