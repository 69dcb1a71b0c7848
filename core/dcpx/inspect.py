"""A model-free, key-free description of a checkpoint (dcpx or stock DCP)."""

from __future__ import annotations

import math
from typing import Any

from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .checkpoint_files import load_manifest, load_metadata
from .tensor_bytes import element_size


def describe(path: str) -> dict[str, Any]:
    metadata, data = load_metadata(path)
    manifest = load_manifest(path, metadata, data)
    raw_by_key = {}
    if manifest:
        raw_by_key = {(i["fqn"], tuple(i["shard_offsets"] or ())): i["raw_size"] for i in manifest["items"]}
    items = []
    transforms: set[str] = set()
    for index, info in sorted((metadata.storage_data or {}).items(), key=lambda kv: (kv[0].fqn, tuple(kv[0].offset or ()))):
        if not isinstance(info, _StorageInfo):
            continue
        md = metadata.state_dict_metadata.get(index.fqn)
        dtype = shape = None
        raw = raw_by_key.get((index.fqn, tuple(index.offset or ())))
        if isinstance(md, TensorStorageMetadata):
            dtype = md.properties.dtype
            chunk = next((c for c in md.chunks if tuple(c.offsets) == tuple(index.offset or ())), None)
            shape = list(chunk.sizes) if chunk is not None else None
            if raw is None and shape is not None:
                raw = math.prod(shape) * element_size(dtype)
        descriptors = list(info.transform_descriptors or [])
        transforms.update(d.partition("/")[0] for d in descriptors if "@dcpx/" not in d or not d.startswith(("frame@", "raw@")))
        items.append({
            "fqn": index.fqn, "shard_offsets": list(index.offset) if index.offset is not None else None,
            "dtype": str(dtype).replace("torch.", "") if dtype is not None else None, "shape": shape,
            "file": info.relative_path, "raw_bytes": raw if raw is not None else (info.length if md is None else None),
            "stored_bytes": info.length, "descriptors": descriptors,
        })
    raw_total = sum(i["raw_bytes"] or 0 for i in items)
    stored_total = sum(i["stored_bytes"] for i in items)
    return {
        "checkpoint_id": metadata.storage_meta.save_id if metadata.storage_meta else None,
        "manifest": manifest is not None,
        "dcpx_version": manifest.get("dcpx_version") if manifest else None,
        "torch_version": manifest.get("torch_version") if manifest else None,
        "transforms": sorted(transforms),
        "items": items,
        "totals": {"items": len(items), "raw_bytes": raw_total, "stored_bytes": stored_total,
                   "ratio": ratio(stored_total, raw_total) if raw_total else 1.0},
    }


def ratio(stored: int, raw: int | None) -> float | None:
    """``stored / raw``, or None without a raw size or where damaged metadata records sizes
    whose quotient no float holds."""
    if not raw:
        return None
    try:
        return stored / raw
    except OverflowError:
        return None
