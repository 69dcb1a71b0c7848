"""Where master keys come from, and how to make one.

A ``Keyring`` answers "which key id do new saves use" and "what are the 32 bytes of key id
X", asking its sources in this order and keeping the first answer:

1. keys passed to the transform: ``dcpx.transform("encrypt", keys={"k2": key}, primary="k2")``;
2. the environment: ``DCPX_ENCRYPT_KEY`` (base64 of one key, id ``default``) and
   ``DCPX_ENCRYPT_KEYS`` (``"id1:<base64>,id2:<base64>"``), with ``DCPX_ENCRYPT_PRIMARY``
   choosing the id for new saves (otherwise the first id listed);
3. a key file named by ``DCPX_ENCRYPT_KEY_FILE``: JSON
   ``{"primary": "k2", "keys": {"k1": "<base64>", "k2": "<base64>"}}``;
4. plugins implementing the ``dcpx_encrypt_get_key`` hook (a KMS, a vault).

Sources are read when a key is first needed and the answer is cached in the keyring, so a
save or load reads the environment and the key file once, and a KMS is asked once per id.
Keys never appear in reprs, messages or checkpoint files; only key ids do.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
import threading
import warnings
from pathlib import Path
from typing import Any, Mapping

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import dcpx

from . import hookspecs
from .errors import KeyConfigError, MissingKeyError, NoKeyConfiguredError, UnknownKeyIdError

KEY_SIZE = 32
DEFAULT_KEY_ID = "default"
ENV_KEY = "DCPX_ENCRYPT_KEY"
ENV_KEYS = "DCPX_ENCRYPT_KEYS"
ENV_PRIMARY = "DCPX_ENCRYPT_PRIMARY"
ENV_KEY_FILE = "DCPX_ENCRYPT_KEY_FILE"
MAX_KEY_FILE_BYTES = 1 << 20

# Key ids travel in envelope headers and descriptors; ':' and ',' are reserved for the
# DCPX_ENCRYPT_KEYS syntax.  '/' lets KMS-style names through.
KEY_ID_MAX_LEN = 64
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/\-]{0,63}$")


def how_to_supply(key_id: str) -> str:
    """The ways to provide key ``key_id``, for error messages."""
    return (
        f"pass it to the transform (dcpx.transform('encrypt', keys={{{key_id!r}: key}})), "
        f"set {ENV_KEYS}='{key_id}:<base64>'"
        + (f" (or {ENV_KEY}=<base64>)" if key_id == DEFAULT_KEY_ID else "")
        + f", list it in the JSON key file named by {ENV_KEY_FILE}, "
        "or install a key-provider plugin implementing dcpx_encrypt_get_key; "
        "`dcpx keygen` prints a new key"
    )


# -- key ids and key material -----------------------------------------------------------
def is_valid_key_id(key_id: object) -> bool:
    return isinstance(key_id, str) and bool(_KEY_ID_RE.match(key_id))


def check_key_id(key_id: object, source: str = "key id") -> str:
    if not is_valid_key_id(key_id):
        raise KeyConfigError(
            f"{source}: invalid key id {key_id!r}: use 1-{KEY_ID_MAX_LEN} characters from "
            "letters, digits and ._/- starting with a letter or digit"
        )
    return key_id  # type: ignore[return-value]


def check_key(value: object, key_id: str, source: str) -> bytes:
    """Accept exactly 32 bytes; say where a bad key came from, never what it was."""
    if isinstance(value, str):
        raise KeyConfigError(
            f"{source}: key {key_id!r} is a str; pass the 32 raw bytes (decode base64 first)", key_id=key_id
        )
    try:
        key = bytes(memoryview(value))  # type: ignore[arg-type]
    except TypeError:
        raise KeyConfigError(
            f"{source}: key {key_id!r} must be bytes, not {type(value).__name__}", key_id=key_id
        ) from None
    if len(key) != KEY_SIZE:
        raise KeyConfigError(
            f"{source}: key {key_id!r} is {len(key)} bytes; AES-256 needs {KEY_SIZE}", key_id=key_id
        )
    return key


def decode_key(text: str, key_id: str, source: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyConfigError(f"{source}: key {key_id!r} is not valid base64", key_id=key_id) from None
    return check_key(raw, key_id, source)


def generate_key() -> bytes:
    """A fresh random 256-bit key (from the operating system's CSPRNG)."""
    return AESGCM.generate_key(bit_length=256)


def encode_key(key: bytes) -> str:
    return base64.b64encode(check_key(key, "?", "encode_key")).decode("ascii")


def format_env(key_id: str, key: bytes) -> str:
    """The environment assignment that supplies ``key`` under ``key_id``, e.g.
    ``DCPX_ENCRYPT_KEY=...`` for the id ``default``, ``DCPX_ENCRYPT_KEYS=id:...`` otherwise."""
    check_key_id(key_id)
    if key_id == DEFAULT_KEY_ID:
        return f"{ENV_KEY}={encode_key(key)}"
    return f"{ENV_KEYS}={key_id}:{encode_key(key)}"


def format_keyfile(keys: Mapping[str, bytes], primary: str | None = None) -> str:
    """A key file (JSON) holding ``keys``; ``primary`` defaults to the only id."""
    if not keys:
        raise KeyConfigError("format_keyfile: no keys")
    for kid in keys:
        check_key_id(kid)
    if primary is None:
        if len(keys) != 1:
            raise KeyConfigError("format_keyfile: several keys, say which one is primary")
        primary = next(iter(keys))
    if primary not in keys:
        raise KeyConfigError(f"format_keyfile: primary {primary!r} is not among the keys")
    doc = {"primary": primary, "keys": {kid: encode_key(k) for kid, k in keys.items()}}
    return json.dumps(doc, indent=2) + "\n"


# -- parsing the environment and the key file ---------------------------------------------
def parse_env_keys(text: str, source: str = ENV_KEYS) -> dict[str, bytes]:
    """Parse ``"id1:<base64>,id2:<base64>"`` (order kept: the first id is the default primary)."""
    keys: dict[str, bytes] = {}
    for n, entry in enumerate(text.split(",")):
        entry = entry.strip()
        if not entry:
            continue
        kid, sep, b64 = entry.partition(":")
        kid = kid.strip()
        if not sep:
            raise KeyConfigError(f"{source}: entry {n + 1} is not '<key id>:<base64 key>'")
        check_key_id(kid, source)
        if kid in keys:
            raise KeyConfigError(f"{source}: key id {kid!r} is listed twice", key_id=kid)
        keys[kid] = decode_key(b64, kid, source)
    if not keys:
        raise KeyConfigError(f"{source} is set but lists no keys")
    return keys


def read_env(environ: Mapping[str, str]) -> tuple[dict[str, bytes], str | None]:
    """Keys and primary id from the environment (empty when nothing is set)."""
    keys: dict[str, bytes] = {}
    primary: str | None = None
    if environ.get(ENV_KEYS):
        keys = parse_env_keys(environ[ENV_KEYS])
        primary = next(iter(keys))
    if environ.get(ENV_KEY):
        single = decode_key(environ[ENV_KEY], DEFAULT_KEY_ID, ENV_KEY)
        if keys.get(DEFAULT_KEY_ID, single) != single:
            raise KeyConfigError(f"{ENV_KEY} and {ENV_KEYS} give different keys for id {DEFAULT_KEY_ID!r}")
        keys.setdefault(DEFAULT_KEY_ID, single)
        primary = primary or DEFAULT_KEY_ID
    if environ.get(ENV_PRIMARY):
        primary = check_key_id(environ[ENV_PRIMARY].strip(), ENV_PRIMARY)
    return keys, primary


def load_keyfile(path: str | os.PathLike[str]) -> tuple[dict[str, bytes], str | None]:
    """Read a JSON key file ``{"primary": id, "keys": {id: base64}}``; strict about shape."""
    source = f"key file {os.fspath(path)!r}"
    p = Path(path)
    try:
        st = p.stat()
        with p.open("rb") as f:  # a pipe (process substitution) has no size: bound the read itself
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyConfigError(f"{source} cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyConfigError(f"{source} is larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeyConfigError(f"{source} is not UTF-8 text: {exc}") from None
    if os.name == "posix" and stat.S_IMODE(st.st_mode) & 0o077:
        warnings.warn(f"{source} is readable by other users; chmod 600 it", stacklevel=4)
    try:
        doc: Any = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise KeyConfigError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), dict) or not doc["keys"]:
        raise KeyConfigError(f'{source}: expected {{"primary": "<id>", "keys": {{"<id>": "<base64>"}}}}')
    unknown = sorted(set(doc) - {"primary", "keys"})
    if unknown:
        raise KeyConfigError(f"{source}: unknown fields {unknown}")
    keys: dict[str, bytes] = {}
    for kid, b64 in doc["keys"].items():
        check_key_id(kid, source)
        if not isinstance(b64, str):
            raise KeyConfigError(f"{source}: key {kid!r} must be a base64 string", key_id=kid)
        keys[kid] = decode_key(b64, kid, source)
    primary = doc.get("primary")
    if primary is not None:
        check_key_id(primary, f"{source} primary")
    elif len(keys) == 1:
        primary = next(iter(keys))
    return keys, primary


# -- the plugin hooks ---------------------------------------------------------------------
def _hook(name: str) -> Any:
    """The dcpx hook caller for ``name`` if any plugin implements it, else None."""
    host = dcpx.plugin_host()
    host.plugins()  # make sure installed plugins (and so key providers) are loaded
    pm = host.pm
    caller = getattr(pm.hook, name, None)
    if caller is None or not caller.get_hookimpls():
        return None
    if caller.spec is None:  # a provider is registered but this plugin was not: add our specs
        try:
            pm.add_hookspecs(hookspecs)
        except ValueError:
            pass
    return caller


def _first(result: Any) -> Any:
    if isinstance(result, list):  # only when our specs are missing (no firstresult)
        return next((r for r in result if r is not None), None)
    return result


# -- the keyring --------------------------------------------------------------------------
class Keyring:
    """Key ids to keys, from explicit keys, environment, key file and hooks (in that order).

    Thread-safe; shared between a reader's configured transform and the per-item transforms
    rebuilt from descriptors, so sources are consulted once per key id.
    """

    def __init__(
        self,
        keys: Mapping[str, bytes] | None = None,
        primary: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if keys is not None and not isinstance(keys, Mapping):
            raise KeyConfigError("keys= must be a mapping {key id: 32-byte key}")
        self._explicit = {check_key_id(k, "keys="): check_key(v, k, "keys=") for k, v in (keys or {}).items()}
        self._primary = None if primary is None else check_key_id(primary, "primary=")
        self._environ = environ  # None: os.environ at lookup time
        self._cache: dict[str, bytes] = dict(self._explicit)
        self._resolved_primary: str | None = None
        self._lock = threading.Lock()

    # Keyrings travel inside transforms that may be copied; locks cannot be.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Keyring ids={sorted(self._cache)} primary={self.primary_hint()!r}>"

    def primary_hint(self) -> str | None:
        """The primary key id if known without consulting any source (for reprs)."""
        if self._resolved_primary or self._primary:
            return self._resolved_primary or self._primary
        return next(iter(self._explicit)) if len(self._explicit) == 1 else None

    @property
    def environ(self) -> Mapping[str, str]:
        return os.environ if self._environ is None else self._environ

    def _file(self) -> tuple[dict[str, bytes], str | None]:
        path = self.environ.get(ENV_KEY_FILE)
        return load_keyfile(path) if path else ({}, None)

    def primary_id(self) -> str:
        """The key id new envelopes are sealed with (resolved once, then fixed)."""
        if self._resolved_primary is not None:
            return self._resolved_primary
        with self._lock:
            if self._resolved_primary is None:
                self._resolved_primary = self._find_primary()
            return self._resolved_primary

    def _find_primary(self) -> str:
        if self._primary is not None:
            return self._primary
        if self._explicit:
            if len(self._explicit) == 1:
                return next(iter(self._explicit))
            raise KeyConfigError(
                f"several keys passed ({sorted(self._explicit)}); choose the one for new saves with primary="
            )
        _, primary = read_env(self.environ)
        if primary is None:
            file_keys, primary = self._file()
            if primary is None and len(file_keys) > 1:
                raise KeyConfigError(
                    f"key file {self.environ.get(ENV_KEY_FILE)!r} holds several keys and no \"primary\"; "
                    f"add one or set {ENV_PRIMARY}"
                )
        if primary is None:
            caller = _hook("dcpx_encrypt_primary_key_id")
            if caller is not None:
                primary = _first(caller())
                if primary is not None:
                    check_key_id(primary, "dcpx_encrypt_primary_key_id hook")
        if primary is None:
            raise NoKeyConfiguredError(
                "no encryption key configured for saving: " + how_to_supply(DEFAULT_KEY_ID)
            )
        return primary

    def has_keys(self) -> bool:
        """Whether any key source is configured: explicit keys, the environment, a key file
        or a key-provider hook.  A reader holding none cannot check a keyed manifest; one
        holding some must not let a manifest name a key id it lacks to skip the check."""
        if self._cache:
            return True
        env_keys, _ = read_env(self.environ)
        return bool(env_keys) or bool(self._file()[0]) or _hook("dcpx_encrypt_get_key") is not None

    def get(self, key_id: str, fqn: str | None = None) -> bytes:
        """The key for ``key_id``; a ``MissingKeyError`` naming the id and how to supply it."""
        key = self._cache.get(key_id)
        if key is not None:
            return key
        with self._lock:
            key = self._cache.get(key_id)
            if key is None:
                key = self._lookup(key_id, fqn)
                self._cache[key_id] = key
            return key

    def _lookup(self, key_id: str, fqn: str | None) -> bytes:
        env_keys, _ = read_env(self.environ)
        if key_id in env_keys:
            return env_keys[key_id]
        file_keys, _ = self._file()
        if key_id in file_keys:
            return file_keys[key_id]
        caller = _hook("dcpx_encrypt_get_key")
        if caller is not None:
            found = _first(caller(key_id=key_id))
            if found is not None:
                return check_key(found, key_id, "dcpx_encrypt_get_key hook")
        where = f" (needed by item {fqn!r})" if fqn else ""
        known = sorted({*self._explicit, *env_keys, *file_keys})
        if not known and caller is None:
            raise NoKeyConfiguredError(
                f"no key configured for key id {key_id!r}{where}: " + how_to_supply(key_id),
                fqn=fqn,
                key_id=key_id,
            )
        raise UnknownKeyIdError(
            f"no key for key id {key_id!r}{where}; configured key ids: {known or 'none'}"
            f"{' (key-provider hooks answered None)' if caller is not None else ''}; "
            + how_to_supply(key_id),
            fqn=fqn,
            key_id=key_id,
        )


__all__ = [
    "DEFAULT_KEY_ID",
    "ENV_KEY",
    "ENV_KEYS",
    "ENV_KEY_FILE",
    "ENV_PRIMARY",
    "KEY_SIZE",
    "Keyring",
    "MissingKeyError",
    "check_key_id",
    "encode_key",
    "format_env",
    "format_keyfile",
    "generate_key",
    "how_to_supply",
    "is_valid_key_id",
    "load_keyfile",
    "parse_env_keys",
    "read_env",
]
