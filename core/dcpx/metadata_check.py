"""Structural checks of an unpickled ``.metadata`` before anything acts on it.

The restricted unpickler guarantees that only DCP types come out of ``.metadata``, not that
their fields hold what torch's planners assume.  An edited file could put a string where a
shape belongs (torch then fails deep inside planning with a bare ``TypeError``), or a
flattening path with index 10**12 in ``planner_data`` (torch's ``set_element`` then appends
that many ``None`` to a list: a hang that ends when memory does).  Each check here names the
entry and what is wrong with it.
"""

from __future__ import annotations

import math
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
# sizes, offsets and lengths: no file or tensor reaches this, and past 4300 digits Python
# cannot even print an integer for the error message
_INT_LIMIT = 1 << 63
_LEAF = object()  # a stored value, as opposed to a container or an empty list slot


def check_metadata(metadata: Any, where: str, size: int) -> None:
    """Raise ``CheckpointFormatError`` unless ``metadata`` (unpickled from ``size`` bytes) is
    DCP ``Metadata`` whose every entry has the shape DCP's planners rely on.  Fields are read
    with ``getattr``: a forged pickle can build an object without calling its constructor.
    Messages are built only on failure, as metadata can hold hundreds of thousands of entries."""
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(metadata, Metadata) or not isinstance(entries, dict):
        raise CheckpointFormatError(f"{where}: does not hold DCP Metadata")
    _check_sharing(metadata, entries, where, size)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):  # every DCP writer records one, if only empty
        raise CheckpointFormatError(f"{where}: storage table is {'missing' if storage is None else 'not a mapping'}")
    meta = getattr(metadata, "storage_meta", None)
    save_id = getattr(meta, "save_id", None)
    if meta is not None and (not isinstance(meta, StorageMeta) or not isinstance(save_id, (str, type(None)))):
        raise CheckpointFormatError(f"{where}: storage_meta is not a StorageMeta with a string save_id: {_shown(meta, 120)}")
    for fqn, entry in entries.items():
        if type(fqn) is not str:
            raise CheckpointFormatError(f"{where}: entry name {_shown(fqn, 80)} is not a string")
        if isinstance(entry, TensorStorageMetadata):
            problem = _tensor_problem(entry)
            if problem:
                raise CheckpointFormatError(f"{where}: tensor {_shown(fqn, 200)}: {problem}")
        elif not isinstance(entry, BytesStorageMetadata):
            raise CheckpointFormatError(f"{where}: entry {_shown(fqn, 200)} is a {type(entry).__name__}, not DCP storage metadata")
    for index, info in (storage or {}).items():
        if isinstance(info, _StorageInfo):  # anything else is refused when an item is read
            check_storage_entry(index, info, where)
            _check_kind(index, entries.get(index.fqn), where)
    planner_data = getattr(metadata, "planner_data", None)
    if isinstance(planner_data, dict):
        _check_flattening_paths(planner_data, where)


def _check_sharing(metadata: Metadata, entries: dict[Any, Any], where: str, size: int) -> None:
    """Refuse metadata that lists more chunks, path steps and descriptors than its bytes can
    hold one by one.  A pickle can reference one object many times: N entries sharing one
    chunk list of C chunks cost the file N + C references but every check, and every planner
    after it, N * C steps (150 KB took 70 s to check)."""
    listed = sum(len(c) for e in entries.values() if isinstance(c := getattr(e, "chunks", None), list))
    planner_data = getattr(metadata, "planner_data", None)
    if isinstance(planner_data, dict):
        listed += sum(len(p) for p in planner_data.values() if isinstance(p, (tuple, list)))
    storage = getattr(metadata, "storage_data", None)
    if isinstance(storage, dict):
        listed += sum(len(d) for i in storage.values()
                      if isinstance(d := getattr(i, "transform_descriptors", None), (tuple, list)))
    if listed > size:
        raise CheckpointFormatError(
            f"{where}: lists {listed} chunks, path steps and descriptors in {size} bytes; "
            "the same objects are referenced over and over (forged)"
        )


def _shown(value: Any, width: int) -> str:
    """``repr(value)`` cut to ``width``; a value that cannot be shown is described instead."""
    try:
        return repr(value)[:width]
    except Exception:  # e.g. integers past Python's 4300-digit limit
        return f"<{type(value).__name__} too large to show>"


def _is_dims(value: Any) -> bool:
    if type(value) is torch.Size:  # holds ints by construction
        return not value or (min(value) >= 0 and max(value) < _INT_LIMIT)
    return isinstance(value, (tuple, list)) and all(type(v) is int and 0 <= v < _INT_LIMIT for v in value)


def _tensor_problem(entry: TensorStorageMetadata) -> str | None:
    dtype = getattr(getattr(entry, "properties", None), "dtype", None)
    if not isinstance(dtype, torch.dtype):
        return f"dtype {_shown(dtype, 80)} is not a torch dtype"
    size = getattr(entry, "size", None)
    if not _is_dims(size):
        return f"size must be a sequence of non-negative integers below 2**63, not {_shown(size, 80)}"
    chunks = getattr(entry, "chunks", None)
    if not isinstance(chunks, list):
        return f"chunk list is a {type(chunks).__name__}, not a list"
    held = 0
    for n, chunk in enumerate(chunks):
        if not isinstance(chunk, ChunkStorageMetadata):
            return f"chunk {n} is a {type(chunk).__name__}, not ChunkStorageMetadata"
        offsets, sizes = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
        if sizes == size and _is_dims(offsets) and len(offsets) == len(size) and not any(offsets):
            held += math.prod(size)
            continue  # the usual single chunk holding the whole tensor
        if not _is_dims(offsets) or not _is_dims(sizes):
            return (f"chunk {n} offsets and sizes must be sequences of non-negative integers below 2**63, "
                    f"not {_shown(offsets, 60)}, {_shown(sizes, 60)}")
        if len(offsets) != len(size) or len(sizes) != len(size):
            return f"chunk {n} has {len(offsets)}/{len(sizes)} dimensions, the tensor {len(size)}"
        # an empty shard may sit anywhere; a non-empty one must lie inside the tensor
        if all(sizes) and any(o + s > d for o, s, d in zip(offsets, sizes, size)):
            return f"chunk {n} at {tuple(offsets)} of size {tuple(sizes)} lies outside the tensor's size {tuple(size)}"
        held += math.prod(sizes)
    # DCP's planner refuses to save overlapping chunks (a 0-dim tensor's copies excepted, one
    # element each); listed many times over, one region would be read and decoded once per
    # chunk into a tensor that holds it once
    if size and held > math.prod(size):
        return f"its {len(chunks)} chunks hold {held} elements, more than the tensor's {math.prod(size)}: they overlap"
    return None


def check_storage_entry(index: Any, info: _StorageInfo, where: str) -> None:
    """One ``storage_data`` entry: a ``MetadataIndex`` key and a complete ``_StorageInfo``."""
    # torch pickles _StorageInfo without its None fields, so a forged entry may lack any of them
    rel, offset, length = (getattr(info, f, None) for f in ("relative_path", "offset", "length"))
    descriptors = getattr(info, "transform_descriptors", None)
    named = isinstance(index, MetadataIndex) and type(getattr(index, "fqn", None)) is str and _shard_key(index)
    placed = type(offset) is int and type(length) is int and 0 <= offset < _INT_LIMIT and 0 <= length < _INT_LIMIT
    listed = descriptors is None or isinstance(descriptors, (list, tuple)) and all(type(d) is str for d in descriptors)
    if named and type(rel) is str and placed and listed:
        return
    fqn = getattr(index, "fqn", index)
    what = f"{where}: storage entry of {_shown(fqn, 200)} (file {_shown(rel, 80)})"
    if not named and isinstance(index, MetadataIndex) and type(getattr(index, "fqn", None)) is str:
        raise CheckpointFormatError(
            f"{what}: its key has offset {_shown(getattr(index, 'offset', None), 60)} and index "
            f"{_shown(getattr(index, 'index', None), 40)}; an offset is a sequence of integers or None, an index an integer or None"
        )
    if not named:
        raise CheckpointFormatError(f"{what}: its key is a {type(index).__name__}, not a MetadataIndex naming an entry")
    if type(rel) is not str:
        raise UnsafeCheckpointError(f"{what}: invalid data file name")
    if not placed:
        raise CheckpointFormatError(f"{what}: offset {_shown(offset, 40)} and length {_shown(length, 40)} must be non-negative integers below 2**63")
    raise CheckpointFormatError(f"{what}: transform descriptors {_shown(descriptors, 120)} must be a list of strings")


def _check_kind(index: MetadataIndex, entry: Any, where: str) -> None:
    """DCP keys a tensor's stored chunk by its offsets and a non-tensor entry by name alone;
    an entry relabelled as the other kind would reach the planner, which fails with a bare
    ``ValueError``, or read one kind of item as the other."""
    if entry is None:
        return  # an item no entry describes is refused when it is read
    tensor = isinstance(entry, TensorStorageMetadata)
    if tensor != (getattr(index, "offset", None) is not None):  # a forged key may lack the field
        kind = "a tensor" if tensor else "a non-tensor entry"
        stored = "a non-tensor entry (no offsets)" if tensor else "a tensor chunk (at offsets)"
        raise CheckpointFormatError(f"{where}: {_shown(index.fqn, 200)} is described as {kind} but stored as {stored}")


def _shard_key(index: MetadataIndex) -> bool:
    """A key's ``offset`` is None or a sequence of integers, its ``index`` None or an integer."""
    offset, position = getattr(index, "offset", None), getattr(index, "index", None)
    offsets_ok = offset is None or isinstance(offset, (tuple, list)) and all(type(o) is int for o in offset)
    return offsets_ok and (position is None or type(position) is int)


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
                            f"{_path_where(where, key, path)}: list index {_shown(step, 40)} lies far beyond the entries saved")
                    node.extend([None] * (step + 1 - len(node)))
                if node[step] is None or last:
                    node[step] = fresh
            elif isinstance(node, dict) and not (last and type(step) is int and step >= len(node)):
                # (torch grows the container as a list when the last step is an int)
                if step not in node or last:
                    node[step] = fresh
            else:
                raise CheckpointFormatError(
                    f"{_path_where(where, key, path)}: step {_shown(step, 40)} does not fit the containers the other paths make")
            node = node[step]


def _path_where(where: str, key: Any, path: Any) -> str:
    return f"{where}: flattening path {_shown(tuple(path), 120)} of entry {_shown(key, 80)}"
