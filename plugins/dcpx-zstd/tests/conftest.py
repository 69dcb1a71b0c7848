"""Shared fixtures for the zstd plugin's tests (conftest modules are not importable under
``--import-mode=importlib``, so helpers are handed out as fixtures)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
from dcpx.transform import ChunkInfo, ItemInfo

from dcpx_zstd import ZstdTransform

MakeChunk = Callable[..., ChunkInfo]


def _chunk_info(size: int, dtype: torch.dtype | None = None, fqn: str = "model.layers.0.weight",
                index: int = 0, count: int = 1) -> ChunkInfo:
    """A hand-made chunk descriptor, as the core's pipeline would build one."""
    item = ItemInfo(fqn=fqn, nbytes=size * count, dtype=dtype, shape=(size,) if dtype is not None else None)
    return ChunkInfo(item, index, count, index * size, size)


def _weights(n: int, dtype: torch.dtype, seed: int = 0, scale: float = 0.02) -> bytes:
    """``n`` weight-like values (normal, small) of ``dtype`` as raw bytes."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g) * scale
    if dtype.is_complex:
        t = torch.complex(t, torch.randn(n, generator=g) * scale).to(dtype)
    elif dtype.is_floating_point:
        t = t.to(dtype)
    else:
        info = torch.iinfo(dtype) if dtype != torch.bool else None
        t = (torch.randint(-1000, 1000, (n,), generator=g) if info is None or info.min < 0
             else torch.randint(0, 1000, (n,), generator=g)).to(dtype)
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.fixture
def chunk_info() -> MakeChunk:
    return _chunk_info


@pytest.fixture
def weights() -> Callable[..., bytes]:
    return _weights


@pytest.fixture
def roundtrip(chunk_info: MakeChunk) -> Callable[..., bytes]:
    """Encode ``data`` as one chunk of an item of ``dtype`` with ``transform`` (per item,
    as the pipeline does), decode it back through a reader built from the descriptor, and
    return the encoded chunk after checking the round trip."""

    def run(data: bytes, dtype: torch.dtype | None = None, transform: ZstdTransform | None = None) -> bytes:
        import dcpx

        chunk = chunk_info(len(data), dtype)
        writer = (transform or ZstdTransform()).for_item(chunk.item)
        encoded = bytes(writer.encode(memoryview(data), chunk))
        reader = dcpx.plugin_host().from_descriptor(writer.get_descriptor())
        decoded = reader.decode(memoryview(encoded), chunk, len(data))
        assert memoryview(decoded).nbytes == len(data)
        assert bytes(memoryview(decoded).cast("B")) == data
        return encoded

    return run


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
