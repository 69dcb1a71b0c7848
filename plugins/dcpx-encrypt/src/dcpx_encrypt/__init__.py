"""dcpx-encrypt: authenticated encryption of dcpx checkpoints (AES-256-GCM, HKDF-SHA256).

``dcpx.transform("encrypt", keys={"k1": key})`` seals every chunk of every item in its own
envelope; see the README for the format, key configuration and threat model.
"""

from .envelope import Header, parse_header
from .errors import (
    CheckpointMismatchError,
    ContextMismatchError,
    EncryptError,
    EnvelopeHeaderError,
    KeyConfigError,
    MissingKeyError,
    NoKeyConfiguredError,
    SegmentAuthenticationError,
    SegmentOrderError,
    SizeMismatchError,
    TrailingDataError,
    TruncatedEnvelopeError,
    UnknownKeyIdError,
    WrongKeyError,
)
from .keys import Keyring, format_env, format_keyfile, generate_key
from .transform import DEFAULT_SEGMENT_SIZE, EncryptTransform

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "CheckpointMismatchError",
    "ContextMismatchError",
    "EncryptError",
    "EncryptTransform",
    "EnvelopeHeaderError",
    "Header",
    "KeyConfigError",
    "Keyring",
    "MissingKeyError",
    "NoKeyConfiguredError",
    "SegmentAuthenticationError",
    "SegmentOrderError",
    "SizeMismatchError",
    "TrailingDataError",
    "TruncatedEnvelopeError",
    "UnknownKeyIdError",
    "WrongKeyError",
    "format_env",
    "format_keyfile",
    "generate_key",
    "parse_header",
]
