"""The dcpx conformance kit, run against the encrypt transform with an explicit test keyring.

The keys are derived from public strings: they protect nothing and exist only so the kit's
generic tests can seal and open envelopes without touching the environment.
"""

from __future__ import annotations

import hashlib

from dcpx.testing import TransformConformance

from dcpx_encrypt import EncryptTransform, Keyring

OLD_KEY = hashlib.sha256(b"dcpx-encrypt conformance key: old").digest()
NEW_KEY = hashlib.sha256(b"dcpx-encrypt conformance key: new").digest()


class TestEncryptConformance(TransformConformance):
    variants = {
        # one explicit key, the smallest segment size: many segments per chunk
        "single-key-4k": lambda: EncryptTransform(keys={"conformance": NEW_KEY}, segment_size=4096),
        # a rotated keyring (old id still readable), default 1 MiB segments
        "keyring-default-segments": lambda: EncryptTransform(
            keyring=Keyring({"old": OLD_KEY, "new": NEW_KEY}, primary="new")),
        "keyring-64k": lambda: EncryptTransform(
            keyring=Keyring({"old": OLD_KEY, "new": NEW_KEY}, primary="old"), segment_size=1 << 16),
    }
    entry_point = "encrypt"
