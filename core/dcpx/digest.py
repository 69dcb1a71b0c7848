"""CRC-32C of the items no transform checks, recorded in the manifest.

Raw tensors and untransformed non-tensor entries are stored exactly as they are, so no
layer of their own would notice a changed byte.  The writer records each one's CRC-32C in
the manifest (``records["crc32c"]``, eight hex digits) and the reader checks it whenever it
reads such an item whole.  This catches corruption, not forgery: without a key the
manifest can be rewritten along with the data (see docs/security.md).  Hardware CRC-32C
runs at several GB/s per core and releases the GIL, so it costs a fraction of the copy.
"""

from __future__ import annotations

import string
from typing import Any, BinaryIO

import crc32c

from .errors import CheckpointFormatError, IntegrityError

RECORD = "crc32c"


def crc(data: Any, value: int = 0) -> int:
    """CRC-32C of ``data`` (any contiguous buffer), continuing from ``value``."""
    return crc32c.crc32c(data, value)


def record(value: int) -> str:
    """How the manifest records a CRC-32C."""
    return f"{value:08x}"


def write_summed(f: BinaryIO, data: Any, block: int = 1 << 20) -> str:
    """Write ``data`` to ``f`` and return its record, summing each block right after it
    is written, while it is still in the CPU cache (no second pass over memory)."""
    view = memoryview(data).cast("B")
    value = 0
    for pos in range(0, view.nbytes, block):
        part = view[pos:pos + block]
        f.write(part)
        value = crc(part, value)
    return record(value)


def check(actual: int, expected: Any, where: str) -> None:
    """Raise unless the CRC-32C ``actual`` is the one the manifest records."""
    if not isinstance(expected, str) or len(expected) != 8 or not set(expected) <= set(string.hexdigits):
        raise CheckpointFormatError(f"{where}: the manifest records a malformed CRC-32C {expected!r}")
    if actual != int(expected, 16):
        raise IntegrityError(
            f"{where}: stored bytes have CRC-32C {actual:08x} but the manifest records {expected.lower()}: "
            "the data file changed after it was saved (disk or copy corruption, or an edit)"
        )
