"""Errors of the checksum layer.

Both are ``dcpx.IntegrityError`` subclasses, so ``except dcpx.IntegrityError`` catches any
corruption whichever layer found it.  The details are attributes as well as text, so a
caller (the ``dcpx verify`` command, a training loop's retry logic) need not parse messages.
"""

from __future__ import annotations

import dcpx


class ChecksumError(dcpx.IntegrityError):
    """A chunk (or item) failed checksum verification.

    ``expected`` is the digest recorded at save time (chunk trailer or manifest), ``actual``
    the one computed from the bytes read back; either is ``None`` where it could not be
    determined (e.g. a truncated chunk has no trailer to read).  ``chunk_index`` is ``None``
    for item-level checks.
    """

    def __init__(
        self,
        message: str,
        *,
        fqn: str | None = None,
        chunk_index: int | None = None,
        algorithm: str | None = None,
        expected: str | None = None,
        actual: str | None = None,
    ) -> None:
        # Keyword-only with defaults: pickling (torch gathers errors across ranks) rebuilds
        # the exception from ``args`` and restores these attributes from ``__dict__``.
        super().__init__(message)
        self.fqn = fqn
        self.chunk_index = chunk_index
        self.algorithm = algorithm
        self.expected = expected
        self.actual = actual


class ChecksumMismatchError(ChecksumError):
    """The digest of the stored bytes differs from the recorded digest."""


class ChecksumFramingError(ChecksumError):
    """The chunk's trailer is missing, damaged, of the wrong length or names another algorithm."""
