"""The per-chunk trailer the checksum layer appends.

One encoded chunk is::

    payload (the input bytes, unchanged) | digest (4, 16 or 32 bytes) | "DCK" | algorithm id (u8)

A trailer rather than a header keeps the payload at offset 0, so ``decode`` returns a
zero-copy prefix of what it was given, and the digest is the plain digest of the payload:
any CRC-32C / XXH3 / SHA-256 tool computes the same value over the same bytes.  The
trailing magic and id let a reader tell a damaged trailer, or one written with another
algorithm, from a payload mismatch.
"""

from __future__ import annotations

from .algorithms import BY_ID, Algorithm

MAGIC = b"DCK"
FOOTER_SIZE = len(MAGIC) + 1


def footer(algorithm: Algorithm) -> bytes:
    """The fixed last bytes of every chunk written with ``algorithm``."""
    return MAGIC + bytes([algorithm.ident])


def trailer_size(algorithm: Algorithm) -> int:
    return algorithm.digest_size + FOOTER_SIZE


def footer_problem(found: bytes, algorithm: Algorithm) -> str | None:
    """Why ``found`` is not the footer ``algorithm`` writes, in words; ``None`` if it is."""
    if len(found) != FOOTER_SIZE or found[: len(MAGIC)] != MAGIC:
        return f"trailer marker is {found[: len(MAGIC)]!r}, expected {MAGIC!r} (trailer damaged or missing)"
    ident = found[-1]
    if ident != algorithm.ident:
        other = BY_ID.get(ident)
        named = f"{other.name} (id {ident})" if other else f"unknown algorithm id {ident}"
        return f"trailer names {named}, but the descriptor says {algorithm.name} (id {algorithm.ident})"
    return None


def writer_of(chunk: memoryview) -> Algorithm | None:
    """The algorithm a chunk's footer names, if it carries a well-formed footer at all."""
    if len(chunk) < FOOTER_SIZE or bytes(chunk[-FOOTER_SIZE:-1]) != MAGIC:
        return None
    return BY_ID.get(chunk[-1])
