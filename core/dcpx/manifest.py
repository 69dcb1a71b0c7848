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
import reprlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import CheckpointFormatError, IntegrityError
from .gc_pause import gc_paused

FORMAT = "dcpx-manifest"
VERSION = 1
PREFIX = ".dcpx-manifest-"
MAX_MANIFEST_BYTES = 1 << 30
MAX_SIZE = 1 << 63  # offsets, lengths and sizes are int64 in torch and in the file formats
# json.loads builds every object before anything is checked, and ``{},`` costs 3 bytes on
# disk but some 80 as a dict.  A manifest takes a few hundred bytes and four JSON containers
# per stored item; these bounds, far above that, keep parsing to memory in proportion to
# the checkpoint its metadata describes.
_BYTES_PER_ITEM, _BASE_BYTES = 64 << 10, 1 << 20
_CONTAINERS_PER_ITEM, _BASE_CONTAINERS = 16, 1024


def size_limit(items: int) -> int:
    """The largest manifest accepted for a checkpoint of ``items`` stored items."""
    return min(MAX_MANIFEST_BYTES, _BASE_BYTES + _BYTES_PER_ITEM * items)


def manifest_name(checkpoint_id: str) -> str:
    return f"{PREFIX}{checkpoint_id}.json"


#: an item's record of the checkpoint id its stored bytes are bound to, where a rank wrote it
#: under an id of its own rather than the checkpoint's (DCP's plan caching; see plan_data.py)
SAVE_ID_RECORD = "save_id"


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


def loads(data: bytes, where: str, items: int | None = None) -> dict[str, Any]:
    """Parse a manifest and check its structure, or raise ``CheckpointFormatError`` naming
    ``where``.  With ``items``, the number of stored items the checkpoint's metadata lists,
    a manifest too large or with too many JSON objects for them is refused before parsing."""
    limit = MAX_MANIFEST_BYTES if items is None else size_limit(items)
    if len(data) > limit:
        raise CheckpointFormatError(f"{where}: manifest of {len(data)} bytes is larger than {limit} bytes"
                                    + ("" if items is None else f", the most for {items} stored items"))
    if items is not None:
        containers = data.count(b"{") + data.count(b"[")
        if containers > _BASE_CONTAINERS + _CONTAINERS_PER_ITEM * items:
            raise CheckpointFormatError(
                f"{where}: manifest holds {containers} JSON objects and arrays, far more than {items} stored items need"
            )
    try:
        with gc_paused():
            manifest = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested thousands deep
        raise CheckpointFormatError(f"{where}: manifest is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointFormatError(f"{where}: not a dcpx manifest")
    version = manifest.get("version")
    if type(version) is not int or version != VERSION:  # True and 1.0 equal 1 but are not version 1
        raise CheckpointFormatError(f"{where}: manifest version {_show(version)} is not supported")
    if not isinstance(manifest.get("items"), list) or not isinstance(manifest.get("metadata_sha256"), str):
        raise CheckpointFormatError(f"{where}: manifest lacks items or metadata hash")
    _check_structure(manifest, where)
    return manifest


# -- structure: checked once in ``loads`` so that every consumer may index the manifest ------
# (its SHA-256 of .metadata binds nothing a forger cannot recompute).  Fields not listed
# here are ignored, so a manifest of a later version with added fields still reads.

def _is_size(value: Any) -> bool:
    """A non-negative integer that fits int64 (a bool is not one, though Python says it is)."""
    return type(value) is int and 0 <= value < MAX_SIZE


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _is_size_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _is_size(v) for k, v in value.items())


def _is_offsets(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(_is_size(v) for v in value))


_A_SIZE = "a non-negative integer below 2**63"
#: top-level fields checked where present: (check, what is expected)
_TOP_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: (_is_str, "a string") for k in ("checkpoint_id", "created", "dcpx_version", "torch_version",
                                           "python", "byteorder", "hmac_sha256")},
    "files": (_is_size_map, "an object mapping file names to non-negative integers below 2**63"),
    "hmac_key": (_is_str_map, "an object of strings"),
}
#: fields every item must have: those of ``ItemRecord``
_ITEM_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "fqn": (_is_str, "a string"),
    "shard_offsets": (_is_offsets, "null or a list of non-negative integers below 2**63"),
    "file": (_is_str, "a string"),
    "offset": (_is_size, _A_SIZE),
    "length": (_is_size, _A_SIZE),
    "raw_size": (_is_size, _A_SIZE),
    "descriptors": (_is_str_list, "a list of strings"),
    "records": (_is_str_map, "an object of strings"),
}
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 80, 80, 3, 6, 4


def _show(value: Any) -> str:
    """A bounded repr: the manifest may hold a megabyte-long string or list."""
    return _SHORT.repr(value)


def _check_structure(manifest: dict[str, Any], where: str) -> None:
    """Raise naming the first field of the wrong type: the top level's, then each item's."""
    for key, (ok, expected) in _TOP_FIELDS.items():
        if key in manifest and not ok(manifest[key]):
            raise CheckpointFormatError(f"{where}: manifest field {key!r} is {_show(manifest[key])}, expected {expected}")
    for n, item in enumerate(manifest["items"]):
        if not _item_ok(item):
            raise CheckpointFormatError(f"{where}: manifest item {n}{_item_problem(item)}")


def _item_ok(item: Any) -> bool:
    """``_ITEM_FIELDS`` unrolled, twice as fast as walking the table (about 2 µs an item);
    the table then only explains a refusal."""
    try:
        return (isinstance(item["fqn"], str) and isinstance(item["file"], str) and _is_size(item["offset"])
                and _is_size(item["length"]) and _is_size(item["raw_size"]) and _is_offsets(item["shard_offsets"])
                and _is_str_list(item["descriptors"]) and _is_str_map(item["records"]))
    except (KeyError, TypeError):  # not a dict, or a field missing
        return False


def _item_problem(item: Any) -> str:
    """What is wrong with an item ``_item_ok`` refused, for the message after its index."""
    if not isinstance(item, dict):
        return f" is {_show(item)}, expected an object"
    for key, (ok, expected) in _ITEM_FIELDS.items():
        if key not in item:
            return f"{_label(item)} lacks {key!r}"
        if not ok(item[key]):
            return f"{_label(item)}: {key!r} is {_show(item[key])}, expected {expected}"
    return f"{_label(item)} is malformed"


def _label(item: dict[str, Any]) -> str:
    """`` ('fqn')`` for an item whose fqn is a string, else nothing."""
    fqn = item.get("fqn")
    return f" ({_show(fqn)})" if isinstance(fqn, str) else ""


def items_by_location(manifest: dict[str, Any] | None) -> dict[tuple[str, int, int], dict[str, Any]]:
    """``(file, offset, length)`` -> the manifest's entry for the item stored there: its
    ``raw_size`` and ``records`` (a CRC-32C, a checksum's item digest); ``loads`` has checked
    their types."""
    if manifest is None:
        return {}
    return {(e["file"], e["offset"], e["length"]): e for e in manifest["items"]}


def check_covers(manifest: dict[str, Any], storage: Any, where: str) -> None:
    """Every item ``.metadata`` stores must have the manifest's entry at its exact location:
    a writer records each one, and an item the reader found no entry for would be read
    without the CRC-32C or item digest the entry holds."""
    recorded = items_by_location(manifest)
    for index, info in (storage or {}).items():
        location = (getattr(info, "relative_path", None), getattr(info, "offset", None), getattr(info, "length", None))
        if location not in recorded:
            raise CheckpointFormatError(
                f"{where}: records no item at file {_show(location[0])}, offset {_show(location[1])}, length "
                f"{_show(location[2])}, where .metadata stores {_show(getattr(index, 'fqn', index))}; "
                "the manifest or .metadata was edited"
            )


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
