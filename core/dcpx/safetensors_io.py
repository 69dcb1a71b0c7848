"""Writing DCP data files that are valid safetensors files (no transforms, raw tensors)."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch

from . import digest
from .tensor_bytes import tensor_bytes

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}


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
        if tensor.dtype not in _DTYPES:
            from .errors import ConfigError

            raise ConfigError(f"{item.index.fqn}: dtype {tensor.dtype} has no safetensors encoding")
        key = item.index.fqn
        if key in header:
            key = f"{key}@{','.join(map(str, item.index.offset))}"
        keys.append(key)
        n = tensor.nbytes
        header[key] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [pos, pos + n]}
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
