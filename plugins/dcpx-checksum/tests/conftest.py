"""Shared fixtures for the checksum plugin's tests (conftest modules are not importable
under ``--import-mode=importlib``, so shared test utilities are handed out as fixtures)."""

from __future__ import annotations

import random
from typing import Callable

import pytest
from dcpx.transform import ChunkInfo, ItemInfo

from dcpx_checksum import ALGORITHMS

MakeChunk = Callable[..., ChunkInfo]
MakePayload = Callable[..., bytes]


def _chunk_info(size: int, fqn: str = "model.layers.0.weight", index: int = 0, count: int = 1) -> ChunkInfo:
    """A hand-made chunk descriptor, as the core's pipeline would build one."""
    return ChunkInfo(ItemInfo(fqn=fqn, nbytes=size * count), index, count, index * size, size)


def _payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def chunk_info() -> MakeChunk:
    return _chunk_info


@pytest.fixture
def payload() -> MakePayload:
    return _payload


@pytest.fixture(params=sorted(ALGORITHMS))
def algorithm(request: pytest.FixtureRequest) -> str:
    return request.param
