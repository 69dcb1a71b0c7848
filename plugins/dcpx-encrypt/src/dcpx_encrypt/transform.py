"""``stream.encrypt@dcpx``: the dcpx transform that seals each chunk in an envelope."""

from __future__ import annotations

from typing import Callable, Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import dcpx
from dcpx.transform import ChunkInfo

from . import envelope
from .envelope import Context, Header
from .errors import EnvelopeHeaderError
from .keys import Keyring, check_key_id, is_valid_key_id

# 1 MiB: the measured optimum on the reference machine (docs/benchmarks-encrypt.md); small
# enough that a 4 MiB chunk splits into a few segments, big enough that per-segment Python
# work is noise next to AES-GCM itself.
DEFAULT_SEGMENT_SIZE = 1 << 20

# Domain separation: the manifest key is derived from, never equal to, a master key.
MANIFEST_HMAC_INFO = b"dcpx-encrypt v1 manifest hmac"

PARAM_KEY_ID = "key_id"
PARAM_SEGMENT_SIZE = "segment_size"


class EncryptTransform(dcpx.Transform):
    """AES-256-GCM envelopes with HKDF-SHA256 per-envelope keys and key commitment.

    Save: ``dcpx.transform("encrypt", keys={"k2": key}, primary="k2")`` (or keys from the
    environment, a key file or a key-provider plugin).  Load: hand the same kind of
    instance to the reader; ``with_descriptor`` carries its keyring to every item.
    """

    name = "stream.encrypt@dcpx"
    version = 1
    verifies_integrity = True  # every segment's GCM tag is checked: ``dcpx verify`` decrypts with the reader's keys

    def __init__(
        self,
        keys: Mapping[str, bytes] | None = None,
        primary: str | None = None,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        *,
        keyring: Keyring | None = None,
    ) -> None:
        if keyring is not None and (keys is not None or primary is not None):
            raise dcpx.ConfigError("pass either keyring= or keys=/primary=, not both")
        self.keyring = keyring if keyring is not None else Keyring(keys, primary)
        self.segment_size = envelope.check_segment_size(segment_size)
        self._recorded_key_id: str | None = None  # set when rebuilt from a descriptor

    # -- descriptor ------------------------------------------------------------------------
    def key_id(self) -> str:
        """The key id this instance seals with: the recorded one, else the keyring's primary."""
        return self._recorded_key_id or self.keyring.primary_id()

    def params(self) -> dict[str, str]:
        return {PARAM_KEY_ID: self.key_id(), PARAM_SEGMENT_SIZE: str(self.segment_size)}

    @classmethod
    def from_params(cls, version: int, params: Mapping[str, str]) -> "EncryptTransform":
        return cls._rebuild(version, params, None)

    def with_descriptor(self, desc: dcpx.Descriptor) -> "EncryptTransform":
        """Rebuild for a stored item, keeping this instance's keyring (the reader's keys)."""
        if desc.name != self.name:
            raise dcpx.DescriptorError(f"{self.name}: cannot rebuild from descriptor {desc.format()!r}")
        return self._rebuild(desc.version, desc.params, self.keyring)

    @classmethod
    def _rebuild(cls, version: int, params: Mapping[str, str], keyring: Keyring | None) -> "EncryptTransform":
        if version != cls.version:
            raise dcpx.DescriptorError(
                f"{cls.name}: unsupported version {version} (this plugin reads {cls.version}); upgrade dcpx-encrypt"
            )
        unknown = sorted(set(params) - {PARAM_KEY_ID, PARAM_SEGMENT_SIZE})
        missing = sorted({PARAM_KEY_ID, PARAM_SEGMENT_SIZE} - set(params))
        if unknown or missing:
            raise dcpx.DescriptorError(f"{cls.name}: unknown parameters {unknown}, missing {missing}")
        key_id, seg = params[PARAM_KEY_ID], params[PARAM_SEGMENT_SIZE]
        if not is_valid_key_id(key_id):
            raise dcpx.DescriptorError(f"{cls.name}: invalid key id {key_id!r}")
        if not seg.isdigit() or str(int(seg)) != seg or int(seg) not in envelope.SEGMENT_SIZES:
            raise dcpx.DescriptorError(f"{cls.name}: invalid segment_size {seg!r}")
        inst = cls(segment_size=int(seg), keyring=keyring)
        inst._recorded_key_id = check_key_id(key_id)
        return inst

    # -- manifest authentication -----------------------------------------------------------
    def manifest_key(self) -> tuple[str, bytes]:
        """(key id, HMAC key) with which the core authenticates the checkpoint manifest."""
        key_id = self.key_id()
        return key_id, self.manifest_key_for(key_id)

    def has_keys(self) -> bool:
        """Whether this instance can find any key at all (the core asks before it lets a
        manifest's key claim go unchecked: only a reader without keys may skip it)."""
        return self.keyring.has_keys()

    def manifest_key_for(self, key_id: str) -> bytes:
        """The manifest HMAC key for ``key_id``: HKDF of the master key, never the key itself."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=MANIFEST_HMAC_INFO).derive(
            self.keyring.get(key_id)
        )

    # -- chunks ----------------------------------------------------------------------------
    def encode(self, data: memoryview, chunk: ChunkInfo) -> memoryview:
        view = _bytes_view(data)
        key_id = self.key_id()
        ctx = Context.from_chunk(chunk)
        key = self.keyring.get(key_id, ctx.fqn)
        return envelope.seal(key, key_id, self.segment_size, view, ctx)

    def decode(self, data: memoryview, chunk: ChunkInfo, size: int) -> memoryview:
        return self._open(data, chunk, size, None)

    def decode_into(self, data: memoryview, chunk: ChunkInfo, out: memoryview) -> None:
        """Decrypt straight into the destination: all header checks and the key commitment
        run before the first byte is written, as ``decode_into`` requires."""
        self._open(data, chunk, out.nbytes, _bytes_view(out))

    def _open(self, data: memoryview, chunk: ChunkInfo, size: int, out: memoryview | None) -> memoryview:
        ctx = Context.from_chunk(chunk)
        return envelope.open_envelope(
            _bytes_view(data), size, ctx, lambda kid: self.keyring.get(kid, ctx.fqn), self._consistent(ctx), out=out
        )

    def _consistent(self, ctx: Context) -> Callable[[Header], None] | None:
        """On the read side, the header must agree with the item's descriptor."""
        recorded = self._recorded_key_id
        if recorded is None:
            return None

        def check(header: Header) -> None:
            if header.key_id != recorded or header.segment_size != self.segment_size:
                raise EnvelopeHeaderError(
                    f"{ctx.where}: envelope header (key id {header.key_id!r}, segment size {header.segment_size}) "
                    f"disagrees with the item's descriptor (key id {recorded!r}, segment size {self.segment_size})",
                    fqn=ctx.fqn,
                    key_id=header.key_id,
                )

        return check

    def __repr__(self) -> str:
        kid = self._recorded_key_id or self.keyring.primary_hint() or "?"
        return f"<EncryptTransform {self.name}/{self.version} key_id={kid!r} segment_size={self.segment_size}>"


def _bytes_view(data: object) -> memoryview:
    view = memoryview(data)  # type: ignore[arg-type]
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view
