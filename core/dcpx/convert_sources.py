"""Where ``dcpx convert`` reads from: DCP directories, ``torch.save`` files, safetensors.

Each source presents DCP metadata plus write items, and reads a group of items at a time.
Nothing is unpickled with ``weights_only=False``.
"""

from __future__ import annotations

import abc
import copy
import io
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from .errors import CheckpointFormatError, ConfigError, DcpxError, UnsafeCheckpointError
from .reader import FileSystemReader
from .checkpoint_files import open_regular
from .torch_archive import check_stored_archive, load_weights_only, weights_only_reason
from .safetensors_io import _DTYPES as _SAFETENSORS_DTYPES, torch_shape
from .tensor_bytes import nbytes_of

PT_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"


@dataclass
class _Blob:
    """A non-tensor item: its ``torch.save`` payload and the value it holds."""

    data: bytes
    value: Any


# -- sources -----------------------------------------------------------------------------
class _Source(abc.ABC):
    """A checkpoint seen as DCP metadata plus items that can be read a group at a time."""

    format: str
    path: str
    metadata: Metadata
    items: list[WriteItem]

    @abc.abstractmethod
    def read(self, items: Sequence[WriteItem]) -> dict[MetadataIndex, torch.Tensor | _Blob]:
        """The values of ``items``, keyed by their storage index."""

    def stored_size(self, item: WriteItem) -> int:
        return 0

    def raw_size(self, item: WriteItem) -> int:
        """Bytes ``item`` takes once read: a tensor chunk's size; a non-tensor's decoded size
        where the source records it, else its stored size."""
        if item.type == WriteItemType.BYTE_IO:
            return self.stored_size(item)
        td = item.tensor_data
        return nbytes_of(tuple(td.chunk.sizes), td.properties.dtype)

    def held_size(self, item: WriteItem) -> int:
        """The most memory ``item`` may take once read, which is what groups are sized by."""
        return self.raw_size(item)

    def groups(self, items: Sequence[WriteItem], limit: int) -> Iterator[list[WriteItem]]:
        """Consecutive items whose held size stays under ``limit`` (one item may exceed it)."""
        group: list[WriteItem] = []
        size = 0
        for item in items:
            n = self.held_size(item)
            if group and size + n > limit:
                yield group
                group, size = [], 0
            group.append(item)
            size += n
        if group:
            yield group


def open_source(path: str, reader_transforms: Sequence[Any] | None = None, workers: int | None = None) -> _Source:
    """Recognise ``path`` as a DCP directory, a ``torch.save`` file or a safetensors file."""
    if os.path.isdir(path):
        return DcpSource(path, reader_transforms, workers)
    if not os.path.exists(path):
        raise CheckpointFormatError(f"{path}: no such file or directory")
    fd, _ = open_regular(path, path)  # a FIFO or a device must not hang or flood the conversion
    os.close(fd)
    if path.lower().endswith(SAFETENSORS_SUFFIX):
        return SafetensorsSource(path)
    if path.lower().endswith(PT_SUFFIXES):
        return TorchSaveSource(path)
    raise CheckpointFormatError(
        f"{path}: not a checkpoint (expected a DCP checkpoint directory, a .pt/.pth torch.save file "
        f"or a .safetensors file)"
    )


class DcpSource(_Source):
    """A DCP checkpoint directory read through the dcpx reader (dcpx or stock torch)."""

    format = "dcp"

    def __init__(self, path: str, reader_transforms: Sequence[Any] | None, workers: int | None) -> None:
        self.path = path
        self.reader = FileSystemReader(path, transforms=reader_transforms, workers=workers)
        metadata = self.reader.read_metadata()
        self.reader.set_up_storage_reader(metadata, True)
        self.metadata = metadata
        self.items = _items_from_metadata(path, metadata)

    def read(self, items: Sequence[WriteItem]) -> dict[MetadataIndex, torch.Tensor | _Blob]:
        requests = [_read_request(item) for item in items]
        sink = _Capture(self.metadata, self.path)
        out: dict[MetadataIndex, torch.Tensor | _Blob] = {}
        try:
            self.reader.read_data(LoadPlan(requests), sink).wait()  # type: ignore[arg-type]
            out.update(sink.tensors)
            for index, data in sink.blobs.items():
                out[index] = _Blob(data, safe_value(index.fqn, data))
        except DcpxError as exc:
            raise _in_path(exc, self.path) from exc
        return out

    def stored_size(self, item: WriteItem) -> int:
        info = self.metadata.storage_data[item.index]
        return int(info.length)

    def raw_size(self, item: WriteItem) -> int:
        if item.type == WriteItemType.BYTE_IO:
            recorded = self.reader.recorded_size(self.metadata.storage_data[item.index])
            if recorded is not None:
                return recorded
        return super().raw_size(item)

    def held_size(self, item: WriteItem) -> int:
        """A transformed non-tensor entry may decode to far more than it stores.  The manifest
        records its size; without one (stock torch's own compression) it may take up to
        ``max_item_bytes``, so it is counted as that and read in a group of its own."""
        info = self.metadata.storage_data[item.index]
        if item.type == WriteItemType.BYTE_IO and info.transform_descriptors and self.reader.recorded_size(info) is None:
            return max(int(info.length), self.reader.max_item_bytes)
        return self.raw_size(item)


def _items_from_metadata(path: str, metadata: Metadata) -> list[WriteItem]:
    """One write item per stored chunk, in file order, keeping the source's indexes."""
    stored: list[tuple[str, int, WriteItem]] = []
    seen: set[tuple[str, tuple[int, ...]]] = set()
    for index, info in (metadata.storage_data or {}).items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise CheckpointFormatError(f"{path}/.metadata: malformed storage entry {index!r}")
        md = metadata.state_dict_metadata.get(index.fqn)
        where = f"{path}: item {index.fqn!r}"
        if isinstance(md, TensorStorageMetadata):
            offsets = tuple(int(o) for o in index.offset or ())
            chunk = next((c for c in md.chunks if tuple(c.offsets) == offsets), None)
            if chunk is None:
                raise CheckpointFormatError(f"{where}: metadata has no chunk at offsets {offsets}")
            whole = len(md.chunks) == 1 and tuple(chunk.sizes) == tuple(md.size)
            item = WriteItem(index, WriteItemType.TENSOR if whole else WriteItemType.SHARD,
                             tensor_data=TensorWriteData(chunk, md.properties, md.size))
            seen.add((index.fqn, offsets))
        elif isinstance(md, BytesStorageMetadata):
            item = WriteItem(index, WriteItemType.BYTE_IO)
            seen.add((index.fqn, ()))
        else:
            raise CheckpointFormatError(f"{where}: has stored data but no entry in state_dict_metadata")
        stored.append((str(info.relative_path), info.offset if isinstance(info.offset, int) else 0, item))
    for fqn, md in metadata.state_dict_metadata.items():
        chunks = [tuple(c.offsets) for c in md.chunks] if isinstance(md, TensorStorageMetadata) else [()]
        for offsets in chunks:
            if (fqn, tuple(int(o) for o in offsets)) not in seen:
                raise CheckpointFormatError(f"{path}: item {fqn!r} (offsets {offsets}) has no stored data")
    stored.sort(key=lambda t: (t[0], t[1]))
    return [item for _, _, item in stored]


def _read_request(item: WriteItem) -> ReadItem:
    if item.type == WriteItemType.BYTE_IO:
        zero = torch.Size([0])
        return ReadItem(LoadItemType.BYTE_IO, item.index, zero, item.index, zero, zero)
    sizes = item.tensor_data.chunk.sizes
    zeros = torch.Size([0] * len(sizes))
    return ReadItem(LoadItemType.TENSOR, item.index, zeros, item.index, zeros, torch.Size(sizes))


class _Capture:
    """The part of a ``LoadPlanner`` the dcpx reader calls: fresh tensors in, results kept."""

    dcpx_weights_only = True  # blobs are kept as bytes and loaded by ``safe_value`` only

    def __init__(self, metadata: Metadata, path: str) -> None:
        self.metadata, self.path = metadata, path
        self.tensors: dict[MetadataIndex, torch.Tensor] = {}
        self.blobs: dict[MetadataIndex, bytes] = {}

    def resolve_tensor(self, req: ReadItem) -> torch.Tensor:
        md = self.metadata.state_dict_metadata[req.storage_index.fqn]
        return allocate(self.path, req.storage_index.fqn, tuple(req.lengths), md.properties.dtype)

    def commit_tensor(self, req: ReadItem, tensor: torch.Tensor) -> None:
        self.tensors[req.storage_index] = tensor

    def load_bytes(self, req: ReadItem, value: io.BytesIO) -> None:
        self.blobs[req.storage_index] = value.getvalue()


def allocate(path: str, fqn: str, size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of the size metadata records for ``fqn``, to read or assemble it into."""
    try:
        return torch.empty(size, dtype=dtype)
    except RuntimeError as exc:  # a size no machine holds: forged or damaged metadata
        raise CheckpointFormatError(f"{path}: item {fqn!r}: cannot allocate its recorded size {size} ({exc})") from exc


class TorchSaveSource(_Source):
    """A ``torch.save`` file, loaded with ``weights_only=True`` and memory-mapped where possible."""

    format = "pt"

    def __init__(self, path: str) -> None:
        self.path = path
        obj = load_torch_file(path)
        if not isinstance(obj, Mapping):
            raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__}, not a state dict")
        _check_string_keys(obj, path)
        try:
            flat, mappings = flatten_state_dict(dict(obj))
        except ValueError as exc:  # e.g. {"a.b": x, "a": {"b": y}} flatten to the same key
            raise CheckpointFormatError(f"{path}: cannot be flattened into DCP keys: {exc}") from exc
        self.values = flat
        self.metadata, self.items = _plan_for_flat(
            {k: (v.dtype, tuple(v.shape)) if isinstance(v, torch.Tensor) else None for k, v in flat.items()}, mappings
        )

    def read(self, items: Sequence[WriteItem]) -> dict[MetadataIndex, torch.Tensor | _Blob]:
        out: dict[MetadataIndex, torch.Tensor | _Blob] = {}
        for item in items:
            value = self.values[item.index.fqn]
            if item.type == WriteItemType.BYTE_IO:
                buffer = io.BytesIO()
                torch.save(value, buffer)
                out[item.index] = _Blob(buffer.getvalue(), value)
            else:
                out[item.index] = value.detach()
        return out


def _check_string_keys(obj: Mapping[Any, Any], path: str) -> None:
    """DCP keys are strings: flattening would turn an optimizer state's parameter ids (ints)
    into '0', '1', ..., which no longer match the optimizer's parameters.  Refuse instead."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(obj, ())]
    while stack:
        value, where = stack.pop()
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    at = ".".join(where) or "the top level"
                    raise CheckpointFormatError(
                        f"{path}: dict key {key!r} at {at} is a {type(key).__name__}; DCP keys are strings, so it "
                        f"would come back as {str(key)!r} (an optimizer's per-parameter state would no longer "
                        "match its parameters). Convert a file whose dict keys are all strings"
                    )
                stack.append((item, where + (key,)))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, where + (str(i),)) for i, item in enumerate(value))


def load_torch_file(path: str) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped when the file allows; errors name the path.
    An archive with compressed members is refused first: ``torch.save`` never compresses, a
    memory-mapped load would take the compressed bytes for tensor data, and a plain one would
    inflate a member whole whatever size it claims."""
    with open(path, "rb") as f:
        check_stored_archive(f, path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:
        text = str(exc)
        if "Weights only load failed" in text:
            raise UnsafeCheckpointError(f"{path}: refused by torch.load(weights_only=True): {weights_only_reason(text)}") from exc
        raise CheckpointFormatError(f"{path}: not a readable torch.save file ({type(exc).__name__}: {_first_line(text)})") from exc


class SafetensorsSource(_Source):
    """A safetensors file, read one tensor at a time through the safetensors library."""

    format = "safetensors"

    def __init__(self, path: str) -> None:
        safe_open = _safetensors().safe_open
        self.path = path
        try:
            self.file = safe_open(path, framework="pt", device="cpu")
            dtypes = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
            entries: dict[str, tuple[torch.dtype, tuple[int, ...]] | None] = {}
            for key in self.file.keys():
                piece = self.file.get_slice(key)
                code = piece.get_dtype()
                if code not in dtypes:
                    raise CheckpointFormatError(f"{path}: tensor {key!r} has unsupported dtype {code}")
                shape = torch_shape(dtypes[code], [int(s) for s in piece.get_shape()])
                if any(s < 0 for s in shape):
                    raise CheckpointFormatError(f"{path}: tensor {key!r} has an odd number of 4-bit {code} values")
                entries[key] = (dtypes[code], shape)
        except DcpxError:
            raise
        except Exception as exc:
            raise CheckpointFormatError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {_first_line(str(exc))})") from exc
        self.metadata, self.items = _plan_for_flat(entries, {k: (k,) for k in entries})

    def read(self, items: Sequence[WriteItem]) -> dict[MetadataIndex, torch.Tensor | _Blob]:
        try:
            return {item.index: self.file.get_tensor(item.index.fqn) for item in items}
        except Exception as exc:
            raise CheckpointFormatError(f"{self.path}: cannot read tensor ({type(exc).__name__}: {_first_line(str(exc))})") from exc


def _plan_for_flat(entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]] | None], mappings: Any) -> tuple[Metadata, list[WriteItem]]:
    """Metadata and write items for a flat state dict, as DCP's default planner makes them.
    ``entries`` maps each key to (dtype, shape) for a tensor, None for any other value."""
    md: dict[str, Any] = {}
    items: list[WriteItem] = []
    for fqn, entry in entries.items():
        if entry is None:
            md[fqn] = BytesStorageMetadata()
            items.append(WriteItem(MetadataIndex(fqn), WriteItemType.BYTE_IO))
            continue
        dtype, shape = entry
        size = torch.Size(shape)
        offsets = torch.Size([0] * len(shape))
        chunk = ChunkStorageMetadata(offsets=offsets, sizes=size)
        properties = TensorProperties(dtype=dtype)
        md[fqn] = TensorStorageMetadata(properties=properties, size=size, chunks=[chunk])
        items.append(WriteItem(MetadataIndex(fqn, offsets, 0), WriteItemType.TENSOR,
                               tensor_data=TensorWriteData(chunk, properties, size)))
    return Metadata(md, planner_data=dict(mappings)), items


def safe_value(fqn: str, data: bytes) -> Any:
    """A non-tensor entry, loaded as ``dcpx.SafeLoadPlanner`` loads it (``weights_only=True``)."""
    return load_weights_only(data, fqn, map_location="cpu")


# -- writing -----------------------------------------------------------------------------


def _safetensors() -> Any:
    try:
        import safetensors
        import safetensors.torch  # noqa: F401
    except ImportError as exc:
        raise ConfigError("reading or writing .safetensors files needs the 'safetensors' distribution (pip install safetensors)") from exc
    return safetensors


def _in_path(exc: DcpxError, path: str) -> DcpxError:
    """The same error (type and attributes kept) with the checkpoint path in front."""
    if str(exc).startswith(path):
        return exc
    named = copy.copy(exc)
    named.args = (f"{path}: {exc}",)
    return named


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""
