"""The digest algorithms a checksum layer can use, each with a stable one-byte id.

Every function here hashes any C-contiguous buffer in place (no copy) and releases the GIL
for large inputs, so the pipeline's thread pool hashes chunks in parallel:

* ``crc32c``   - CRC-32C (Castagnoli), the checksum S3 and GCS report; hardware instructions
                 (SSE 4.2 / ARMv8) through the ``crc32c`` package.  Stored big-endian, as
                 those services print it.
* ``xxh3-128`` - XXH3 128-bit through ``xxhash``: as fast, with far fewer accidental
                 collisions for very large checkpoints.  Stored in xxHash's canonical
                 (big-endian) form.
* ``sha256``   - SHA-256 from ``hashlib``: slow, but a digest other tools and policies
                 already trust.  None of the three is a MAC: use the encrypt plugin to
                 detect deliberate tampering.

Ids are part of the on-disk format: never renumber, only append.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import crc32c as _crc32c
import xxhash as _xxhash

import dcpx

Hasher = Callable[[memoryview], bytes]


@dataclass(frozen=True)
class Algorithm:
    """One digest algorithm: its descriptor name, on-disk id and digest length."""

    name: str
    ident: int
    digest_size: int
    _hash: Hasher

    def digest(self, data: memoryview) -> bytes:
        """The digest of ``data`` (any C-contiguous buffer), hashed in place."""
        return self._hash(data)


def _crc32c_digest(data: memoryview) -> bytes:
    return _crc32c.crc32c(data).to_bytes(4, "big")


def _xxh3_128_digest(data: memoryview) -> bytes:
    return _xxhash.xxh3_128_digest(data)


def _sha256_digest(data: memoryview) -> bytes:
    return hashlib.sha256(data).digest()


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("crc32c", 1, 4, _crc32c_digest),
        Algorithm("xxh3-128", 2, 16, _xxh3_128_digest),
        Algorithm("sha256", 3, 32, _sha256_digest),
    )
}
BY_ID: dict[int, Algorithm] = {a.ident: a for a in ALGORITHMS.values()}
DEFAULT_ALGORITHM = "crc32c"


def get(name: object) -> Algorithm:
    """Look an algorithm up by its descriptor name (user input: a ``dcpx.ConfigError`` if unknown)."""
    algorithm = ALGORITHMS.get(name) if isinstance(name, str) else None
    if algorithm is None:
        raise dcpx.ConfigError(f"unknown checksum algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    return algorithm

