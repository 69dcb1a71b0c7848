"""Zero-copy views between CPU tensors and bytes (dtype and shape live in DCP metadata)."""

from __future__ import annotations

import math
import sys
from typing import Sequence

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

if sys.byteorder != "little":  # the on-disk format is little-endian; say so instead of corrupting
    raise ImportError("dcpx supports little-endian machines only")


#: dtypes whose values need a scale and zero point besides the stored integers
QUANTIZED = frozenset({torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4})


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def nbytes_of(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> int:
    return math.prod(shape) * element_size(dtype)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without copying.  Keep the tensor alive."""
    if tensor.numel() == 0:
        return memoryview(b"")
    flat = tensor.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def writable_bytes(tensor: torch.Tensor) -> memoryview | None:
    """A writable byte view of ``tensor`` if it is a contiguous CPU tensor, else None (a
    wrapper subclass's values live in its inner tensors: it is filled through ``copy_``)."""
    if (tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.is_conj() or tensor.is_neg()
            or is_traceable_wrapper_subclass(tensor)):
        return None
    return tensor_bytes(tensor)


def region(tensor: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
    """The view of ``tensor`` at ``offsets`` with ``sizes`` (a DCP chunk's box)."""
    for dim, (o, n) in enumerate(zip(offsets, sizes)):
        tensor = tensor.narrow(dim, int(o), int(n))
    return tensor


def logical_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The logical bytes of a tensor, so comparison is bit-exact (NaNs, -0.0 included)."""
    flat = tensor.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)
