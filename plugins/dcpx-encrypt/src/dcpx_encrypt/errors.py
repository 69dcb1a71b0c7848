"""Errors of the encrypt plugin: one class per failure, so callers and tests can tell
a wrong key from a moved envelope from a cut-off file.

Every class derives from ``EncryptError`` and from the dcpx class that fits it
(``IntegrityError`` for authentication failures, ``CheckpointFormatError`` for malformed
envelopes, ``ConfigError`` for missing or malformed keys), so ``except dcpx.IntegrityError``
keeps working for code that knows nothing about this plugin.  Messages name the item
(``fqn``) and the key id, never key material.
"""

from __future__ import annotations

import dcpx


class EncryptError(dcpx.DcpxError):
    """Base class of the encrypt plugin's errors; ``fqn`` and ``key_id`` when known."""

    def __init__(self, message: str, *, fqn: str | None = None, key_id: str | None = None) -> None:
        super().__init__(message)
        self.fqn = fqn
        self.key_id = key_id


# -- malformed envelopes (no key needed to notice) ---------------------------------------
class EnvelopeHeaderError(EncryptError, dcpx.CheckpointFormatError):
    """The envelope header is malformed: magic, version, suite or a field out of range."""


class SizeMismatchError(EncryptError, dcpx.CheckpointFormatError):
    """The envelope's plaintext size differs from the size the checkpoint metadata records."""


class TruncatedEnvelopeError(EncryptError, dcpx.IntegrityError):
    """The envelope ends early: cut off, or segments removed."""


class TrailingDataError(EncryptError, dcpx.IntegrityError):
    """Bytes or whole segments follow the envelope's final segment."""


# -- authentication failures -------------------------------------------------------------
class WrongKeyError(EncryptError, dcpx.IntegrityError):
    """The key found for the envelope's key id does not open it (or its header was changed)."""


class ContextMismatchError(EncryptError, dcpx.IntegrityError):
    """The envelope is authentic but belongs elsewhere: another item, chunk or inner chain."""


class CheckpointMismatchError(ContextMismatchError):
    """The envelope is authentic but was written by another checkpoint."""


class SegmentOrderError(EncryptError, dcpx.IntegrityError):
    """A segment is authentic but sits at the wrong position (reordered, duplicated, swapped)."""


class SegmentAuthenticationError(EncryptError, dcpx.IntegrityError):
    """A segment fails AES-GCM authentication: its bytes were modified."""


# -- keys ---------------------------------------------------------------------------------
class KeyConfigError(EncryptError, dcpx.ConfigError):
    """A key source is malformed (bad base64, wrong length, bad key file, bad key id)."""


class MissingKeyError(KeyConfigError):
    """No key is available for a key id that is needed."""


class NoKeyConfiguredError(MissingKeyError):
    """No key source is configured at all, so there is no key to save or load with."""


class UnknownKeyIdError(MissingKeyError):
    """Keys are configured, but none of the sources knows this key id."""


__all__ = [
    "CheckpointMismatchError",
    "ContextMismatchError",
    "EncryptError",
    "EnvelopeHeaderError",
    "KeyConfigError",
    "MissingKeyError",
    "NoKeyConfiguredError",
    "SegmentAuthenticationError",
    "SegmentOrderError",
    "SizeMismatchError",
    "TrailingDataError",
    "TruncatedEnvelopeError",
    "UnknownKeyIdError",
    "WrongKeyError",
]
