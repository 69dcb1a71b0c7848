"""The v1 envelope: byte layout, key derivation, sealing and opening one chunk.

One envelope per chunk.  All integers little-endian.

    off        size  field
    0          4     magic b"DCPE"
    4          1     format version (1)
    5          1     suite (1 = HKDF-SHA256 + AES-256-GCM, 96-bit nonce, 128-bit tag)
    6          1     key id length n (1..64)
    7          1     reserved, 0
    8          4     segment size S (power of two, 4 KiB..64 MiB)
    12         8     plaintext size P (<= 2**40)
    20         n     key id (ASCII)
    20+n       32    salt (os.urandom, fresh per envelope)
    52+n       16    key check        = HKDF(K, salt, L_KC || prefix)
    68+n       16    checkpoint check = HKDF(K, salt, L_CP || prefix || lp(checkpoint id))
    84+n       32    key commitment   = HKDF(K, salt, L_ENV || prefix || context)[32:64]
    116+n      ...   segments: max(1, ceil(P/S)) x (ciphertext || 16-byte tag)

``prefix`` is bytes 0..52+n (everything before the key check), ``K`` the master key.  The
segment key is the first 32 bytes of the same HKDF output as the commitment; segment i is
sealed with AES-256-GCM, nonce = 3 zero bytes || u64 big-endian i || u8 last-flag, no AAD.
"""

from __future__ import annotations

import hmac
import os
import struct
from dataclasses import dataclass
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import dcpx
from dcpx.transform import ChunkInfo

from .errors import (
    CheckpointMismatchError,
    ContextMismatchError,
    EncryptError,
    EnvelopeHeaderError,
    SegmentAuthenticationError,
    SegmentOrderError,
    SizeMismatchError,
    TrailingDataError,
    TruncatedEnvelopeError,
    WrongKeyError,
)
from .keys import KEY_ID_MAX_LEN, KEY_SIZE, is_valid_key_id

MAGIC = b"DCPE"
FORMAT_VERSION = 1
SUITE = 1  # HKDF-SHA256 key derivation + AES-256-GCM segments
SALT_SIZE = 32
KEY_CHECK_SIZE = 16
CHECKPOINT_CHECK_SIZE = 16
COMMITMENT_SIZE = 32
TAG_SIZE = 16
MIN_SEGMENT_SIZE = 1 << 12
MAX_SEGMENT_SIZE = 1 << 26  # well under GCM's 2**36-byte limit per (key, nonce)
MAX_PLAINTEXT_SIZE = 1 << 40
SEGMENT_SIZES = tuple(1 << s for s in range(12, 27))

LABEL_KEY_CHECK = b"dcpx-encrypt/1 key-check\x00"
LABEL_CHECKPOINT = b"dcpx-encrypt/1 checkpoint\x00"
LABEL_ENVELOPE = b"dcpx-encrypt/1 envelope\x00"

_FIXED = struct.Struct("<4sBBBBIQ")  # magic, version, suite, key id length, reserved, S, P
_NONCE = struct.Struct(">3xQB")  # 12 bytes: zero, counter, last-segment flag
_LEN = struct.Struct("<I")
_CHECKS = KEY_CHECK_SIZE + CHECKPOINT_CHECK_SIZE + COMMITMENT_SIZE
DIAGNOSE_BUDGET = 64 << 20  # bytes of trial decryption spent explaining a failed segment

_INTO = hasattr(AESGCM, "encrypt_into")  # newer cryptography: seal/open straight into our buffer

try:  # numpy hands out uninitialised memory; bytearray(n) zero-fills first (~20% of AES-GCM's time)
    import numpy as _np

    def _output(size: int) -> memoryview:
        return memoryview(_np.empty(size, dtype=_np.uint8))

except ImportError:  # pragma: no cover - dcpx's tensor views need numpy anyway

    def _output(size: int) -> memoryview:
        return memoryview(bytearray(size))


def segment_count(plaintext_size: int, segment_size: int) -> int:
    """Segments of a plaintext: an empty one still gets one (tag-only) final segment."""
    return max(1, -(-plaintext_size // segment_size))


def envelope_size(plaintext_size: int, segment_size: int, key_id_len: int) -> int:
    header = _FIXED.size + key_id_len + SALT_SIZE + _CHECKS
    return header + plaintext_size + TAG_SIZE * segment_count(plaintext_size, segment_size)


def nonce(index: int, last: bool) -> bytes:
    return _NONCE.pack(index, last)


def _lp(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


@dataclass(frozen=True)
class Context:
    """Where an envelope belongs; bound into its key so it cannot be moved elsewhere.

    ``offsets`` are the item's shard offsets (empty for non-tensor items and scalars)."""

    fqn: str
    checkpoint_id: str
    offsets: tuple[int, ...]
    index: int
    offset: int
    size: int
    inner: tuple[str, ...]

    @classmethod
    def from_chunk(cls, chunk: ChunkInfo) -> "Context":
        item = chunk.item
        offsets = tuple(int(o) for o in item.offsets or ())
        return cls(item.fqn, item.checkpoint_id, offsets, chunk.index, chunk.offset, chunk.size, tuple(chunk.inner))

    @property
    def where(self) -> str:
        return f"item {self.fqn!r} chunk {self.index}"

    def encode(self) -> bytes:
        """Unambiguous bytes: every variable field is length-prefixed."""
        return b"".join((
            _lp(self.checkpoint_id.encode("utf-8", "surrogatepass")),
            _lp(self.fqn.encode("utf-8", "surrogatepass")),
            struct.pack(f"<I{len(self.offsets)}q", len(self.offsets), *self.offsets),
            struct.pack("<QQQ", self.index, self.offset, self.size),
            _LEN.pack(len(self.inner)),
            *(_lp(d.encode("utf-8")) for d in self.inner),
        ))


@dataclass(frozen=True)
class Header:
    version: int
    suite: int
    segment_size: int
    plaintext_size: int
    key_id: str
    salt: bytes
    key_check: bytes
    checkpoint_check: bytes
    commitment: bytes
    prefix: bytes  # the header bytes before the key check

    @property
    def size(self) -> int:
        return len(self.prefix) + _CHECKS

    @property
    def segment_count(self) -> int:
        return segment_count(self.plaintext_size, self.segment_size)

    @property
    def envelope_size(self) -> int:
        return self.size + self.plaintext_size + TAG_SIZE * self.segment_count


@dataclass(frozen=True)
class Derived:
    key_check: bytes
    checkpoint_check: bytes
    commitment: bytes
    aead_key: bytes


def _hkdf(master: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(master)


def derive(master: bytes, prefix: bytes, salt: bytes, ctx: Context) -> Derived:
    """Per-envelope values from the master key, the salt, the header prefix and the context."""
    if len(master) != KEY_SIZE:
        raise dcpx.ConfigError(f"master key must be {KEY_SIZE} bytes")
    key_check = _hkdf(master, salt, LABEL_KEY_CHECK + prefix, KEY_CHECK_SIZE)
    ckpt = _hkdf(master, salt, LABEL_CHECKPOINT + prefix + _lp(ctx.checkpoint_id.encode("utf-8", "surrogatepass")),
                 CHECKPOINT_CHECK_SIZE)
    okm = _hkdf(master, salt, LABEL_ENVELOPE + prefix + ctx.encode(), KEY_SIZE + COMMITMENT_SIZE)
    return Derived(key_check, ckpt, okm[KEY_SIZE:], okm[:KEY_SIZE])


def pack_prefix(segment_size: int, plaintext_size: int, key_id: str, salt: bytes) -> bytes:
    kid = key_id.encode("ascii")
    return _FIXED.pack(MAGIC, FORMAT_VERSION, SUITE, len(kid), 0, segment_size, plaintext_size) + kid + salt


def check_segment_size(segment_size: object) -> int:
    if not isinstance(segment_size, int) or segment_size not in SEGMENT_SIZES:
        raise dcpx.ConfigError(
            f"segment_size must be a power of two from {MIN_SEGMENT_SIZE} to {MAX_SEGMENT_SIZE}, got {segment_size!r}"
        )
    return segment_size


# -- sealing ------------------------------------------------------------------------------
def seal(master: bytes, key_id: str, segment_size: int, data: memoryview, ctx: Context,
         *, salt: bytes | None = None) -> memoryview:
    """Encrypt one chunk into a new envelope (one output allocation, no other copies).

    ``salt`` exists for reproducing known-answer files only: a salt must never be reused."""
    size = data.nbytes
    if size > MAX_PLAINTEXT_SIZE:
        raise dcpx.ConfigError(f"{ctx.where}: {size} bytes is more than one envelope holds ({MAX_PLAINTEXT_SIZE})")
    if salt is None:
        salt = os.urandom(SALT_SIZE)
    elif len(salt) != SALT_SIZE:
        raise dcpx.ConfigError(f"salt must be {SALT_SIZE} bytes")
    prefix = pack_prefix(segment_size, size, key_id, salt)
    d = derive(master, prefix, salt, ctx)
    count = segment_count(size, segment_size)
    header_size = len(prefix) + _CHECKS
    view = _output(header_size + size + TAG_SIZE * count)  # every byte is written below
    view[:header_size] = b"".join((prefix, d.key_check, d.checkpoint_check, d.commitment))
    aead = AESGCM(d.aead_key)
    pos = header_size
    for i in range(count):
        part = data[i * segment_size:(i + 1) * segment_size]
        end = pos + len(part) + TAG_SIZE
        if _INTO:
            aead.encrypt_into(nonce(i, i == count - 1), part, None, view[pos:end])
        else:
            view[pos:end] = aead.encrypt(nonce(i, i == count - 1), part, None)
        pos = end
    return view


# -- opening ------------------------------------------------------------------------------
def parse_header(data: memoryview, ctx: Context | None = None) -> Header:
    """Parse and range-check a header without any key; nothing is allocated beyond it."""
    where = ctx.where if ctx else "envelope"
    kw = {"fqn": ctx.fqn if ctx else None}
    if data.nbytes < _FIXED.size:
        raise TruncatedEnvelopeError(f"{where}: {data.nbytes} bytes is shorter than an envelope header", **kw)
    magic, version, suite, kid_len, reserved, seg, psize = _FIXED.unpack_from(data, 0)
    if magic != MAGIC:
        raise EnvelopeHeaderError(f"{where}: not an encrypted envelope (magic {bytes(magic)!r})", **kw)
    if version != FORMAT_VERSION:
        raise EnvelopeHeaderError(f"{where}: envelope format version {version}; this plugin reads {FORMAT_VERSION}",
                                  **kw)
    if suite != SUITE:
        raise EnvelopeHeaderError(f"{where}: unknown cipher suite {suite}; this plugin knows {SUITE}", **kw)
    if not 1 <= kid_len <= KEY_ID_MAX_LEN:
        raise EnvelopeHeaderError(f"{where}: key id length {kid_len} out of range 1..{KEY_ID_MAX_LEN}", **kw)
    if reserved != 0:
        raise EnvelopeHeaderError(f"{where}: reserved header byte is {reserved}, expected 0", **kw)
    if seg not in SEGMENT_SIZES:
        raise EnvelopeHeaderError(f"{where}: segment size {seg} is not a power of two in "
                                  f"{MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE}", **kw)
    if psize > MAX_PLAINTEXT_SIZE:
        raise EnvelopeHeaderError(f"{where}: plaintext size {psize} exceeds {MAX_PLAINTEXT_SIZE}", **kw)
    header_size = _FIXED.size + kid_len + SALT_SIZE + _CHECKS
    if data.nbytes < header_size:
        raise TruncatedEnvelopeError(f"{where}: envelope of {data.nbytes} bytes ends inside its "
                                     f"{header_size}-byte header", **kw)
    pos = _FIXED.size
    raw_kid = bytes(data[pos:pos + kid_len])
    key_id = raw_kid.decode("ascii", "replace")
    if not is_valid_key_id(key_id):
        raise EnvelopeHeaderError(f"{where}: malformed key id {raw_kid!r}", **kw)
    pos += kid_len
    fields = []
    for n in (SALT_SIZE, KEY_CHECK_SIZE, CHECKPOINT_CHECK_SIZE, COMMITMENT_SIZE):
        fields.append(bytes(data[pos:pos + n]))
        pos += n
    prefix = bytes(data[:_FIXED.size + kid_len + SALT_SIZE])
    return Header(version, suite, seg, psize, key_id, *fields, prefix=prefix)


def check_layout(header: Header, data_size: int, size: int, ctx: Context) -> None:
    """Sizes first: the metadata's plaintext size, then the envelope's own length."""
    kw = {"fqn": ctx.fqn, "key_id": header.key_id}
    if header.plaintext_size != size:
        raise SizeMismatchError(f"{ctx.where}: envelope holds {header.plaintext_size} bytes, checkpoint "
                                f"metadata records {size}", **kw)
    expected = header.envelope_size
    if data_size < expected:
        raise TruncatedEnvelopeError(f"{ctx.where}: envelope is {data_size} bytes, its header implies "
                                     f"{expected}: cut off or segments removed", **kw)
    if data_size > expected:
        raise TrailingDataError(f"{ctx.where}: {data_size - expected} unexpected bytes after the final "
                                f"segment (envelope is {expected} bytes)", **kw)


def verify(header: Header, d: Derived, ctx: Context) -> None:
    """Constant-time checks, key first, then checkpoint, then the full commitment."""
    kw = {"fqn": ctx.fqn, "key_id": header.key_id}
    if not hmac.compare_digest(d.key_check, header.key_check):
        raise WrongKeyError(f"{ctx.where}: the key for key id {header.key_id!r} does not open this envelope "
                            "(wrong key under that id, or the envelope header was modified)", **kw)
    if not hmac.compare_digest(d.checkpoint_check, header.checkpoint_check):
        raise CheckpointMismatchError(f"{ctx.where}: envelope was written by a different checkpoint than "
                                      f"{ctx.checkpoint_id!r} (copied or swapped between checkpoints)", **kw)
    if not hmac.compare_digest(d.commitment, header.commitment):
        raise ContextMismatchError(f"{ctx.where}: envelope belongs to another item, shard, chunk or transform "
                                   f"chain (inner={list(ctx.inner)}): moved or swapped", **kw)


def open_envelope(
    data: memoryview,
    size: int,
    ctx: Context,
    get_key: Callable[[str], bytes],
    check: Callable[[Header], None] | None = None,
    out: memoryview | None = None,
) -> memoryview:
    """Verify and decrypt one envelope into ``out`` (exactly ``size`` bytes, format "B"),
    or into a new buffer when ``out`` is None.

    Every structural check and the key commitment come before the output is allocated or
    any segment is decrypted.  A segment that fails authentication is zeroed in the
    output before the error is raised: AES-GCM writes its plaintext before it checks
    the tag, and unauthenticated bytes must not be left in a caller's tensor."""
    header = parse_header(data, ctx)
    if check is not None:
        check(header)
    check_layout(header, data.nbytes, size, ctx)
    d = derive(get_key(header.key_id), header.prefix, header.salt, ctx)
    verify(header, d, ctx)
    aead = AESGCM(d.aead_key)
    if out is not None and out.nbytes != size:
        raise ValueError(f"{ctx.where}: output buffer has {out.nbytes} bytes, the envelope holds {size}")
    view = _output(size) if out is None else out  # every byte is written below, or an error is raised
    seg, count = header.segment_size, header.segment_count
    pos = header.size
    for i in range(count):
        start = i * seg
        stop = min(start + seg, size)
        end = pos + (stop - start) + TAG_SIZE
        sealed = data[pos:end]
        try:
            if _INTO:
                aead.decrypt_into(nonce(i, i == count - 1), sealed, None, view[start:stop])
            else:
                view[start:stop] = aead.decrypt(nonce(i, i == count - 1), sealed, None)
        except InvalidTag:
            view[start:stop] = bytes(stop - start)
            raise _diagnose(aead, sealed, i, count, ctx, header.key_id) from None
        pos = end
    return view


def _diagnose(aead: AESGCM, sealed: memoryview, i: int, count: int, ctx: Context, key_id: str) -> EncryptError:
    """Explain why segment ``i`` failed: does it open at another position of this envelope?

    Runs only after a failure, within ``DIAGNOSE_BUDGET`` bytes of trial decryption.  (A
    segment at the right position with the wrong last-flag cannot occur: the plaintext size
    is in the header, which the segment key is derived from.)"""
    kw = {"fqn": ctx.fqn, "key_id": key_id}
    candidates = [(j, flag) for j in range(count) if j != i for flag in (j == count - 1, j != count - 1)]
    budget = max(1, DIAGNOSE_BUDGET // max(1, sealed.nbytes))
    for j, flag in candidates[:budget]:
        try:
            aead.decrypt(nonce(j, flag), sealed, None)
        except InvalidTag:
            continue
        return SegmentOrderError(f"{ctx.where}: segment {i} of {count} is segment {j}"
                                 f"{' (final)' if flag else ''}: segments reordered, duplicated or swapped", **kw)
    return SegmentAuthenticationError(f"{ctx.where}: segment {i} of {count} failed authentication "
                                      "(its bytes were modified)", **kw)
