"""Checking a converted checkpoint: every item of the destination is decoded and compared
with the source's, a group of items at a time, bit for bit (NaNs and -0.0 included)."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from .convert_sources import DcpSource, _Blob, _Source
from .errors import DcpxError, IntegrityError
from .tensor_bytes import logical_bytes, region

#: ``progress(stage, done_bytes, total_bytes)``; stage is "convert" or "verify".
Progress = Callable[[str, int, int], None]


class ConvertVerificationError(IntegrityError):
    """The written destination does not decode to the source's items."""


def compare(source: _Source, written: _Source, group_bytes: int, progress: Progress | None = None, total: int = 0) -> None:
    """Check that every item of ``written`` decodes and equals ``source``'s, a group at a time."""
    dst = written.path
    src_fqns = {i.index.fqn for i in source.items}
    dst_fqns = {i.index.fqn for i in written.items}
    if src_fqns != dst_fqns:
        missing, extra = sorted(src_fqns - dst_fqns), sorted(dst_fqns - src_fqns)
        raise ConvertVerificationError(f"{dst}: items differ from {source.path}: missing {missing[:5]}, unexpected {extra[:5]}")
    if isinstance(written, DcpSource) and isinstance(source, DcpSource):
        if written.metadata.state_dict_metadata != source.metadata.state_dict_metadata:
            raise ConvertVerificationError(f"{dst}: state_dict_metadata differs from {source.path}'s")
        if set(written.metadata.storage_data) != set(source.metadata.storage_data):
            raise ConvertVerificationError(f"{dst}: stored chunks differ from {source.path}'s")
    by_fqn: dict[str, list[WriteItem]] = {}
    for item in written.items:
        by_fqn.setdefault(item.index.fqn, []).append(item)
    done = 0
    for group in source.groups(source.items, group_bytes):
        holders = [_holder(item, by_fqn[item.index.fqn], dst) for item in group]
        expected = source.read(group)
        try:
            actual = written.read(list({h.index: h for h in holders}.values()))
        except DcpxError as exc:
            raise ConvertVerificationError(f"{dst}: does not read back: {exc}") from exc
        for item, holder in zip(group, holders):
            _compare_item(item, expected[item.index], holder, actual[holder.index], dst)
        del expected, actual
        done += sum(source.raw_size(i) for i in group)
        if progress is not None:
            progress("verify", done, total)


def _where(item: WriteItem, dst: str) -> str:
    shard = f" at offsets {tuple(item.index.offset)}" if item.type == WriteItemType.SHARD else ""
    return f"{dst}: item {item.index.fqn!r}{shard}"


def _holder(item: WriteItem, candidates: list[WriteItem], dst: str) -> WriteItem:
    """The destination item that holds ``item``'s data (the same chunk, or a whole tensor)."""
    if item.type == WriteItemType.BYTE_IO:
        if candidates[0].type != WriteItemType.BYTE_IO:
            raise ConvertVerificationError(f"{_where(item, dst)}: expected a non-tensor entry, found a tensor")
        return candidates[0]
    offsets, sizes = tuple(item.tensor_data.chunk.offsets), tuple(item.tensor_data.chunk.sizes)
    for cand in candidates:
        if cand.type == WriteItemType.BYTE_IO:
            raise ConvertVerificationError(f"{_where(item, dst)}: expected a tensor, found a non-tensor entry")
        c_off, c_size = tuple(cand.tensor_data.chunk.offsets), tuple(cand.tensor_data.chunk.sizes)
        if len(c_off) == len(offsets) and all(co <= o and o + s <= co + cs for co, cs, o, s in zip(c_off, c_size, offsets, sizes)):
            return cand
    raise ConvertVerificationError(f"{_where(item, dst)}: no stored chunk covers offsets {offsets}")


def _compare_item(item: WriteItem, expected: torch.Tensor | _Blob, holder: WriteItem, got: torch.Tensor | _Blob, dst: str) -> None:
    where = _where(item, dst)
    if isinstance(expected, _Blob):
        if not isinstance(got, _Blob):
            raise ConvertVerificationError(f"{where}: expected a non-tensor entry, found a tensor")
        if got.data != expected.data and not same_value(got.value, expected.value):
            raise ConvertVerificationError(f"{where}: value differs from the source")
        return
    if not isinstance(got, torch.Tensor):
        raise ConvertVerificationError(f"{where}: expected a tensor, found a non-tensor entry")
    chunk, held = item.tensor_data.chunk, holder.tensor_data.chunk
    box = region(got, [o - h for o, h in zip(chunk.offsets, held.offsets)], chunk.sizes)
    if box.dtype != expected.dtype or tuple(box.shape) != tuple(expected.shape):
        raise ConvertVerificationError(
            f"{where}: {box.dtype} {tuple(box.shape)} where the source has {expected.dtype} {tuple(expected.shape)}"
        )
    if not torch.equal(logical_bytes(box), logical_bytes(expected)):
        raise ConvertVerificationError(f"{where}: tensor bytes differ from the source")


def same_value(a: Any, b: Any) -> bool:
    """Equality for loaded non-tensor entries: tensors bit for bit, containers element-wise."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(logical_bytes(a), logical_bytes(b)))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:
        return False
