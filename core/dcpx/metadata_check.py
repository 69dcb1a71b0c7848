"""Structural checks of an unpickled ``.metadata`` before anything acts on it.

The restricted unpickler guarantees that only DCP types come out of ``.metadata``, not that
their fields hold what torch's planners assume.  An edited file could put a string where a
shape belongs (torch then fails deep inside planning with a bare ``TypeError``), or a
flattening path with index 10**12 in ``planner_data`` (torch's ``set_element`` then appends
that many ``None`` to a list: a hang that ends when memory does).  Each check here names the
entry and what is wrong with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)

from .errors import CheckpointFormatError, UnsafeCheckpointError

# list slots allowed beyond one per path step, for gaps left by empty dicts in lists (8 MiB)
_GAP_SLOTS = 1 << 20
_LEAF = object()  # a stored value, as opposed to a container or an empty list slot


def check_metadata(metadata: Any, where: str) -> None:
    """Raise ``CheckpointFormatError`` unless ``metadata`` is DCP ``Metadata`` whose every
    entry has the shape DCP's planners rely on.  Fields are read with ``getattr``: a forged
    pickle can build an object without calling its constructor.  Messages are built only on
    failure, as metadata can hold hundreds of thousands of entries."""
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(metadata, Metadata) or not isinstance(entries, dict):
        raise CheckpointFormatError(f"{where}: does not hold DCP Metadata")
    storage = getattr(metadata, "storage_data", None)
    if storage is not None and not isinstance(storage, dict):
        raise CheckpointFormatError(f"{where}: storage table is not a mapping")
    meta = getattr(metadata, "storage_meta", None)
    save_id = getattr(meta, "save_id", None)
    if meta is not None and (not isinstance(meta, StorageMeta) or not isinstance(save_id, (str, type(None)))):
        raise CheckpointFormatError(f"{where}: storage_meta is not a StorageMeta with a string save_id: {meta!r:.120}")
    for fqn, entry in entries.items():
        if type(fqn) is not str:
            raise CheckpointFormatError(f"{where}: entry name {fqn!r:.80} is not a string")
        if isinstance(entry, TensorStorageMetadata):
            problem = _tensor_problem(entry)
            if problem:
                raise CheckpointFormatError(f"{where}: tensor {fqn!r:.200}: {problem}")
        elif not isinstance(entry, BytesStorageMetadata):
            raise CheckpointFormatError(f"{where}: entry {fqn!r:.200} is a {type(entry).__name__}, not DCP storage metadata")
    for index, info in (storage or {}).items():
        if isinstance(info, _StorageInfo):  # anything else is refused when an item is read
            check_storage_entry(index, info, where)
    planner_data = getattr(metadata, "planner_data", None)
    if isinstance(planner_data, dict):
        _check_flattening_paths(planner_data, where)


def _is_dims(value: Any) -> bool:
    if type(value) is torch.Size:  # holds ints by construction
        return not value or min(value) >= 0
    return isinstance(value, (tuple, list)) and all(type(v) is int and v >= 0 for v in value)


def _tensor_problem(entry: TensorStorageMetadata) -> str | None:
    dtype = getattr(getattr(entry, "properties", None), "dtype", None)
    if not isinstance(dtype, torch.dtype):
        return f"dtype {dtype!r:.80} is not a torch dtype"
    size = getattr(entry, "size", None)
    if not _is_dims(size):
        return f"size must be a sequence of non-negative integers, not {size!r:.80}"
    chunks = getattr(entry, "chunks", None)
    if not isinstance(chunks, list):
        return f"chunk list is a {type(chunks).__name__}, not a list"
    for n, chunk in enumerate(chunks):
        if not isinstance(chunk, ChunkStorageMetadata):
            return f"chunk {n} is a {type(chunk).__name__}, not ChunkStorageMetadata"
        offsets, sizes = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
        if sizes == size and _is_dims(offsets) and len(offsets) == len(size) and not any(offsets):
            continue  # the usual single chunk holding the whole tensor
        if not _is_dims(offsets) or not _is_dims(sizes):
            return (f"chunk {n} offsets and sizes must be sequences of non-negative integers, "
                    f"not {offsets!r:.60}, {sizes!r:.60}")
        if len(offsets) != len(size) or len(sizes) != len(size):
            return f"chunk {n} has {len(offsets)}/{len(sizes)} dimensions, the tensor {len(size)}"
        # an empty shard may sit anywhere; a non-empty one must lie inside the tensor
        if all(sizes) and any(o + s > d for o, s, d in zip(offsets, sizes, size)):
            return f"chunk {n} at {tuple(offsets)} of size {tuple(sizes)} lies outside the tensor's size {tuple(size)}"
    return None


def check_storage_entry(index: Any, info: _StorageInfo, where: str) -> None:
    """One ``storage_data`` entry: a ``MetadataIndex`` key and a complete ``_StorageInfo``."""
    # torch pickles _StorageInfo without its None fields, so a forged entry may lack any of them
    rel, offset, length = (getattr(info, f, None) for f in ("relative_path", "offset", "length"))
    descriptors = getattr(info, "transform_descriptors", None)
    named = isinstance(index, MetadataIndex) and type(getattr(index, "fqn", None)) is str
    placed = type(offset) is int and type(length) is int and offset >= 0 and length >= 0
    listed = descriptors is None or isinstance(descriptors, (list, tuple)) and all(type(d) is str for d in descriptors)
    if named and type(rel) is str and placed and listed:
        return
    fqn = getattr(index, "fqn", index)
    what = f"{where}: storage entry of {fqn!r:.200} (file {rel!r:.80})"
    if not named:
        raise CheckpointFormatError(f"{what}: its key is a {type(index).__name__}, not a MetadataIndex naming an entry")
    if type(rel) is not str:
        raise UnsafeCheckpointError(f"{what}: invalid data file name")
    if not placed:
        raise CheckpointFormatError(f"{what}: offset {offset!r:.40} and length {length!r:.40} must be non-negative integers")
    raise CheckpointFormatError(f"{what}: transform descriptors {descriptors!r:.120} must be a list of strings")


def _check_flattening_paths(planner_data: dict[Any, Any], where: str) -> None:
    """Replay DCP's unflattening (``set_element``) on a skeleton, with a budget on list slots.

    A saved state dict numbers list elements densely (an empty dict in a list leaves a gap),
    so all lists together have about as many slots as the paths have steps; an index far
    beyond that is a forgery.  Values that are not paths belong to some other planner and
    are left alone."""
    paths = [(k, p) for k, p in planner_data.items()
             if isinstance(p, (tuple, list)) and p and all(type(e) in (str, int) for e in p)]
    budget = sum(len(p) for _, p in paths) + _GAP_SLOTS
    root: dict[Any, Any] = {}
    for key, path in paths:
        node: Any = root
        for i, step in enumerate(path):
            last = i == len(path) - 1
            fresh: Any = _LEAF if last else ({} if type(path[i + 1]) is str else [])
            if isinstance(node, list) and type(step) is int and step >= 0:
                if step >= len(node):
                    budget -= step + 1 - len(node)
                    if budget < 0:
                        raise CheckpointFormatError(
                            f"{_path_where(where, key, path)}: list index {step} lies far beyond the entries saved")
                    node.extend([None] * (step + 1 - len(node)))
                if node[step] is None or last:
                    node[step] = fresh
            elif isinstance(node, dict) and not (last and type(step) is int and step >= len(node)):
                # (torch grows the container as a list when the last step is an int)
                if step not in node or last:
                    node[step] = fresh
            else:
                raise CheckpointFormatError(
                    f"{_path_where(where, key, path)}: step {step!r:.40} does not fit the containers the other paths make")
            node = node[step]


def _path_where(where: str, key: Any, path: Any) -> str:
    return f"{where}: flattening path {tuple(path)!r:.120} of entry {key!r:.80}"
