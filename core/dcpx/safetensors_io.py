"""Writing DCP data files that are valid safetensors files (no transforms, raw tensors)."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch

from . import digest
from .errors import ConfigError
from .tensor_bytes import tensor_bytes

# The codes safetensors 0.8 writes for these torch dtypes (the codes its ``safe_open`` and
# ``load_file`` map back to them); any other dtype has none.
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.float8_e8m0fnu: "F8_E8M0", torch.float4_e2m1fn_x2: "F4",
    torch.complex64: "C64",
}
MAX_HEADER_BYTES = 100_000_000  # the largest header safetensors itself reads
#: dtypes whose elements each pack two safetensors values (F4 counts 4-bit values)
_PACKED_PAIRS = {torch.float4_e2m1fn_x2}


def write_safetensors_file(path: str, tensors: Sequence[tuple[Any, torch.Tensor]],
                           sync: bool) -> list[tuple[Any, int, int, str]]:
    """Write ``(write_item, tensor)`` pairs as one safetensors file.

    Returns ``(write_item, offset, length, crc32c record)`` with offsets relative to the
    file start, so DCP metadata points straight at each tensor's bytes inside the
    safetensors payload.
    """
    header: dict[str, Any] = {}
    saved_offsets: dict[str, list[int]] = {}
    pos = 0
    keys = []
    for item, tensor in tensors:
        key = item.index.fqn
        if key in header:
            key = f"{key}@{','.join(map(str, item.index.offset))}"
        keys.append(key)
        n = tensor.nbytes
        header[key] = {"dtype": _dtype_code(tensor, item.index.fqn), "shape": _shape(tensor), "data_offsets": [pos, pos + n]}
        if item.index.offset is not None:
            saved_offsets[key] = list(item.index.offset)
        pos += n
    header["__metadata__"] = {"format": "pt", "DCP_SHARDING_INFO": json.dumps({k: {"saved_offsets": v} for k, v in saved_offsets.items()})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    base = 8 + len(blob)
    placed = []
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for (item, tensor), key in zip(tensors, keys):
            crc = digest.write_summed(f, tensor_bytes(tensor))
            start, end = header[key]["data_offsets"]
            placed.append((item, base + start, end - start, crc))
        if sync:
            f.flush()
            os.fsync(f.fileno())
    return placed


def _dtype_code(tensor: torch.Tensor, fqn: str) -> str:
    """The safetensors dtype code of ``tensor``, or ``ConfigError`` naming the item."""
    code = _DTYPES.get(tensor.dtype)
    if code is None:
        raise ConfigError(f"{fqn!r}: safetensors has no dtype code for {tensor.dtype}; "
                          "save it with the default serialization format")
    if tensor.dtype in _PACKED_PAIRS and tensor.dim() == 0:
        raise ConfigError(f"{fqn!r}: safetensors cannot hold a 0-d {tensor.dtype} tensor ({code} shapes count "
                          "4-bit values); save it with the default serialization format")
    return code


def _shape(tensor: torch.Tensor) -> list[int]:
    """The shape safetensors records: in values, so a packed pair doubles the last dimension."""
    shape = list(tensor.shape)
    if tensor.dtype in _PACKED_PAIRS:
        shape[-1] *= 2
    return shape


def torch_shape(dtype: torch.dtype, shape: list[int]) -> tuple[int, ...]:
    """The torch shape of a tensor safetensors records with ``shape``: ``_shape`` undone.
    A packed pair whose recorded last dimension is odd cannot be one; the caller refuses it."""
    out = list(shape)
    if dtype in _PACKED_PAIRS and out:
        out[-1] = out[-1] // 2 if out[-1] % 2 == 0 else -1
    return tuple(out)


def starts_safetensors_file(head: bytes) -> bool:
    """Whether ``head`` begins a safetensors file (an 8-byte little-endian header length,
    then the JSON header's ``{``): what stock torch 2.13's ``SerializationFormat.SAFETENSORS``
    points every tensor item at, where a reader expects a ``torch.save`` payload."""
    return len(head) >= 9 and 2 <= int.from_bytes(head[:8], "little") <= MAX_HEADER_BYTES and head[8:9] == b"{"
