"""The JSON manifest written beside ``.metadata``.

It records, in a form any tool can read without unpickling, the checkpoint id, every item's
location, descriptors, raw size and per-item transform results (digests), and the SHA-256
of the ``.metadata`` bytes it belongs to.  ``.metadata`` names its manifest through
``storage_meta.save_id``; a reader that finds the hash disagreeing refuses the checkpoint.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointFormatError, IntegrityError
from .gc_pause import gc_paused

FORMAT = "dcpx-manifest"
VERSION = 1
PREFIX = ".dcpx-manifest-"
MAX_MANIFEST_BYTES = 1 << 30


def manifest_name(checkpoint_id: str) -> str:
    return f"{PREFIX}{checkpoint_id}.json"


@dataclass
class ItemRecord:
    fqn: str
    shard_offsets: list[int] | None
    file: str
    offset: int
    length: int
    raw_size: int
    descriptors: list[str]
    records: dict[str, str] = field(default_factory=dict)


def build(checkpoint_id: str, metadata_bytes: bytes, items: list[ItemRecord], extra: dict[str, Any]) -> dict[str, Any]:
    import torch

    from . import __version__

    return {
        "format": FORMAT,
        "version": VERSION,
        "checkpoint_id": checkpoint_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dcpx_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "byteorder": sys.byteorder,
        "metadata_sha256": hashlib.sha256(metadata_bytes).hexdigest(),
        **extra,
        "items": [vars(i) for i in sorted(items, key=lambda r: (r.fqn, r.shard_offsets or []))],
    }


def dumps(manifest: dict[str, Any], hmac_key: bytes | None = None) -> bytes:
    body = dict(manifest)
    body.pop("hmac_sha256", None)
    if hmac_key is not None:
        body["hmac_sha256"] = hmac.new(hmac_key, _canonical(body), hashlib.sha256).hexdigest()
    # One item per line, by hand: json's fast C encoder does not indent, and its Python one
    # took most of a 10,000-item save's commit.  Items stay easy to read and grep.
    items = body.pop("items")
    head = json.dumps(body, sort_keys=True)[:-1]
    rows = ",\n".join(json.dumps(item, sort_keys=True) for item in items)
    return f'{head}, "items": [\n{rows}\n]}}\n'.encode()


def loads(data: bytes, where: str) -> dict[str, Any]:
    if len(data) > MAX_MANIFEST_BYTES:
        raise CheckpointFormatError(f"{where}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        with gc_paused():
            manifest = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested thousands deep
        raise CheckpointFormatError(f"{where}: manifest is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointFormatError(f"{where}: not a dcpx manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointFormatError(f"{where}: manifest version {manifest.get('version')!r} is not supported")
    if not isinstance(manifest.get("items"), list) or not isinstance(manifest.get("metadata_sha256"), str):
        raise CheckpointFormatError(f"{where}: manifest lacks items or metadata hash")
    return manifest


def verify(manifest: dict[str, Any], metadata_bytes: bytes, where: str, hmac_key: bytes | None = None) -> None:
    """Check that the manifest belongs to these metadata bytes (and, with a key, its HMAC)."""
    actual = hashlib.sha256(metadata_bytes).hexdigest()
    if not hmac.compare_digest(actual.encode(), str(manifest["metadata_sha256"]).encode("utf-8", "replace")):
        raise IntegrityError(
            f"{where}: .metadata SHA-256 {actual} does not match the manifest's {manifest['metadata_sha256']}; "
            "the metadata was modified or belongs to another save"
        )
    if hmac_key is not None:
        tag = manifest.get("hmac_sha256")
        body = {k: v for k, v in manifest.items() if k != "hmac_sha256"}
        expected = hmac.new(hmac_key, _canonical(body), hashlib.sha256).hexdigest()
        if not isinstance(tag, str) or not hmac.compare_digest(tag.encode("utf-8", "replace"), expected.encode()):
            raise IntegrityError(
                f"{where}: manifest HMAC does not verify with key {manifest.get('hmac_key', {}).get('key_id')!r}: "
                "the key is wrong, or the manifest or .metadata was modified"
            )


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def path_in(directory: str | os.PathLike, checkpoint_id: str) -> str:
    return os.path.join(os.fspath(directory), manifest_name(checkpoint_id))
