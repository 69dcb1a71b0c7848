"""One item on its way to a data file: the tensor the plan describes, its pieces written
in order, and the result that describes it.

The file's thread calls these continuations strictly in submission order while chunk
encodes run ahead on the pool, so an item's offset is where its first piece lands.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from . import digest
from .errors import ConfigError
from .framing import FRAME_DESCRIPTOR, FrameIndex
from .pipeline import BoundChain
from .transform import ItemInfo


@dataclass
class ItemStorageInfo(_StorageInfo):
    """``_StorageInfo`` plus what the manifest needs; reduced to plain ``_StorageInfo`` in
    ``finish`` so ``.metadata`` holds only torch's own types."""

    raw_size: int = 0
    records: dict[str, str] = field(default_factory=dict)

    def plain(self) -> _StorageInfo:
        return _StorageInfo(self.relative_path, self.offset, self.length, self.transform_descriptors)


@dataclass
class WholeItem:
    """An item written in one piece: its stored bytes and descriptors."""

    data: Any
    descriptors: list[str] | None
    record_crc: bool = False  # stored as it is: the manifest's CRC-32C is its only check


class ItemState:
    """Tracks one item while its pieces are written in order by the file's thread."""

    def __init__(self, item: WriteItem, name: str, info: ItemInfo, keep: Any, chunk_size: int) -> None:
        self.item, self.name, self.info, self.keep = item, name, info, keep
        self.chunk_size = chunk_size
        self.offset: int | None = None
        self.chain: BoundChain | None = None
        self.sizes: list[tuple[int, ...]] = []
        self.records: list[tuple[str | None, ...]] = []

    def _start(self, f: io.BufferedWriter) -> None:
        if self.offset is None:
            self.offset = f.tell()

    def write_whole(self, f: io.BufferedWriter, whole: WholeItem) -> WriteResult:
        self._start(f)
        records: dict[str, str] = {}
        if whole.record_crc:
            records[digest.RECORD] = digest.write_summed(f, whole.data)
        else:
            f.write(whole.data)
        length = f.tell() - self.offset
        self.keep = None
        return item_result(self.item, self.name, self.offset, length, whole.descriptors, self.info.nbytes, records)

    def write_chunk(self, f: io.BufferedWriter, encoded: Any) -> None:
        self._start(f)
        f.write(encoded.data)
        self.sizes.append(encoded.layer_sizes)
        self.records.append(encoded.records)

    def write_index(self, f: io.BufferedWriter, _: None) -> WriteResult:
        assert self.chain is not None
        self._start(f)
        index = FrameIndex(self.info.nbytes, self.chunk_size, len(self.chain.transforms), tuple(self.sizes))
        f.write(index.encode())
        records: dict[str, str] = {}
        for layer, transform in enumerate(self.chain.transforms):
            value = transform.item_record(self.info, [r[layer] for r in self.records])
            if value is not None:
                records[self.chain.descriptors[layer]] = value
        length = f.tell() - self.offset
        self.keep = None
        descriptors = [FRAME_DESCRIPTOR, *self.chain.outermost_first()]
        return item_result(self.item, self.name, self.offset, length, descriptors, self.info.nbytes, records)


def item_tensor(item: WriteItem, data: Any, for_torch_save: bool = False) -> torch.Tensor:
    """A contiguous CPU tensor with the data's values.  Raw writes need only contiguity;
    ``torch.save`` (compat mode) writes the whole storage, so it gets a minimal one, and
    it pickles wrapper subclasses, which raw writes cannot store.

    The plan's dtype and chunk shape become the checkpoint's metadata, and a raw item is
    read back as exactly that: a tensor from ``planner.resolve_data`` that differs would be
    stored as garbage (same element size) or as a checkpoint no reader can load."""
    fqn = item.index.fqn
    if not isinstance(data, torch.Tensor):
        raise ConfigError(f"{fqn}: the save planner's resolve_data returned a {type(data).__name__} for a tensor item")
    planned = item.tensor_data
    if planned is not None and (data.dtype != planned.properties.dtype or tuple(data.shape) != tuple(planned.chunk.sizes)):
        raise ConfigError(
            f"{fqn}: the save planner's resolve_data returned a {data.dtype} tensor of shape {tuple(data.shape)}, "
            f"but the plan records {planned.properties.dtype} of shape {tuple(planned.chunk.sizes)}; a planner that "
            "converts tensors must record the new dtype in its plan (WriteItem.tensor_data.properties.dtype)"
        )
    if is_traceable_wrapper_subclass(data) and not for_torch_save:
        raise ConfigError(
            f"{fqn}: a {type(data).__name__} is a wrapper tensor subclass, whose values live in inner tensors, "
            "and dcpx stores a tensor item as its elements; save with compat=True (torch.save items, as stock "
            "torch writes them), or save its plain values or inner tensors instead"
        )
    if data.layout != torch.strided:  # DCP stores a tensor as its dense elements (stock torch fails too)
        raise ConfigError(f"{fqn}: a {data.layout} tensor cannot be saved as a DCP item; store tensor.to_dense(), "
                          "or its indices and values as separate tensors")
    tensor = data.detach().resolve_conj().resolve_neg()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if for_torch_save and not is_traceable_wrapper_subclass(tensor) and tensor.untyped_storage().nbytes() != tensor.nbytes:
        tensor = tensor.clone()
    return tensor


def torch_save_bytes(item: WriteItem, data: Any, chain: BoundChain) -> WholeItem:
    """Compat mode: the item exactly as stock torch writes it (torch.save, torch's streams)."""
    from .transform import _Sink

    sink = _Sink()
    stream: Any = sink
    exts = [t.extension for t in chain.transforms]  # type: ignore[attr-defined]
    for ext in reversed(exts):
        stream = ext.transform_to(stream)
    if item.type == WriteItemType.BYTE_IO:
        stream.write(data)
    else:
        torch.save(data, stream)
    stream.close()
    return WholeItem(sink.getvalue(), chain.outermost_first() or None)


def item_result(item: WriteItem, name: str, offset: int, length: int, descriptors: list[str] | None,
            raw_size: int, records: dict[str, str]) -> WriteResult:
    info = ItemStorageInfo(name, offset, length, descriptors, raw_size=raw_size, records=records)
    return WriteResult(index=item.index, size_in_bytes=length, storage_data=info)
