"""Hooks this plugin adds to dcpx, so a key-management plugin can supply keys.

The encrypt plugin registers these specs through ``dcpx_addhooks``.  A KMS plugin is an
ordinary dcpx plugin (entry point in the group ``dcpx``) that implements them::

    import dcpx

    @dcpx.hookimpl
    def dcpx_encrypt_get_key(key_id: str) -> bytes | None:
        if key_id.startswith("kms/"):
            return fetch_data_key(key_id)     # 32 bytes
        return None                           # not mine: let other providers answer

Hooks are asked last, after keys passed to the transform, the environment and the key
file; each key id is asked for at most once per keyring (the answer is cached).
"""

from __future__ import annotations

import dcpx


@dcpx.hookspec(firstresult=True)
def dcpx_encrypt_get_key(key_id: str) -> bytes | None:
    """Return the 32-byte master key named ``key_id``, or ``None`` if this provider does not
    hold it.  The first non-``None`` answer wins.  Raise to stop the lookup with an error."""


@dcpx.hookspec(firstresult=True)
def dcpx_encrypt_primary_key_id() -> str | None:
    """Return the key id new saves should use when the user configured none, or ``None``.

    Lets a KMS plugin make ``transforms=["encrypt"]`` work without any other set-up."""


__all__ = ["dcpx_encrypt_get_key", "dcpx_encrypt_primary_key_id"]
