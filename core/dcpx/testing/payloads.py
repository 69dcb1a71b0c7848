"""Deterministic test payloads: the bytes a transform meets in real checkpoints, and the edges.

A payload is described by an item *kind* (which dtype the bytes belong to), a *pattern*
(random, highly compressible, weight-like, all zeros, float special values) and a size in
bytes.  Sizes need not be multiples of the element size: with a user-chosen ``chunk_size``
a chunk of a float32 item can end in the middle of an element.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..transform import ChunkInfo, ItemInfo

KINDS: dict[str, torch.dtype | None] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "bytes": None,
}
PATTERNS = ("random", "compressible", "weights", "zeros", "special")
# empty, tiny, odd, and both sides of the powers of two that codecs and ciphers segment on
SMALL_SIZES = (0, 1, 3, 8, 64, 1000, 4095, 4096, 4097, 65535, 65536, 65537)
# around 1 MiB (a common segment size) and a multi-MiB chunk
LARGE_SIZES = ((1 << 20) - 1, (1 << 20) + 1, (3 << 20) + 5)
LARGE_PATTERNS = ("random", "compressible")
CHECKPOINT_ID = "0f3c2a9e5b7d4e1f8a6c0b2d4e6f8a1c"
FQN = "conformance.layers.7.weight"


@dataclass(frozen=True)
class Case:
    """One payload placed as one chunk of one item."""

    kind: str
    pattern: str
    size: int
    middle: bool  # a middle chunk (index 1 of 3, non-zero offset) instead of the only one

    @property
    def label(self) -> str:
        where = "middle chunk" if self.middle else "only chunk"
        return f"{self.kind} item, {self.pattern} payload of {self.size} bytes, {where}"


def patterns_for(kind: str) -> tuple[str, ...]:
    """Patterns meaningful for ``kind`` (float special values only for floats)."""
    dtype = KINDS[kind]
    return tuple(p for p in PATTERNS if p != "special" or (dtype is not None and dtype.is_floating_point))


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


@functools.lru_cache(maxsize=256)  # bytes are immutable; every variant meets the same payloads
def payload(kind: str, pattern: str, size: int) -> bytes:
    """``size`` bytes of ``pattern`` as an item of ``kind`` would hold them."""
    if size == 0:
        return b""
    dtype = KINDS[kind]
    rng = np.random.default_rng(_seed(kind, pattern, size))
    if pattern == "random":
        return rng.bytes(size)
    if pattern == "zeros":
        return bytes(size)
    itemsize = 1 if dtype is None else torch.empty((), dtype=dtype).element_size()
    n = -(-size // itemsize)
    gen = torch.Generator().manual_seed(_seed(kind, pattern, size))
    if dtype is None:
        data = _bytes_payload(pattern, size, rng)
    elif pattern == "compressible":
        data = _values(_few_values(dtype)[torch.randint(0, 4, (n,), generator=gen) // 3], dtype)
    elif pattern == "weights":
        if dtype.is_floating_point:
            data = _values(torch.randn(n, generator=gen) * 0.02, dtype)
        else:
            data = _values(torch.randint(-1000, 1000, (n,), generator=gen), dtype)
    elif pattern == "special":
        fi = torch.finfo(dtype)
        specials = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0,
                                 fi.tiny, fi.tiny / 4, fi.max, fi.min])  # tiny / 4: subnormal
        mixed = torch.randn(n, generator=gen)
        pick = torch.randint(0, 2, (n,), generator=gen).bool()
        mixed[pick] = specials[torch.randint(0, len(specials), (int(pick.sum()),), generator=gen)]
        data = _values(mixed, dtype)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return data[:size]


def _few_values(dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.tensor([0.0, 0.5, -1.25, 3.0])
    return torch.tensor([0, 1, -7, 1 << 40])


def _values(t: torch.Tensor, dtype: torch.dtype) -> bytes:
    return t.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()


def _bytes_payload(pattern: str, size: int, rng: np.random.Generator) -> bytes:
    if pattern == "compressible":
        lines, total, step = [], 0, 0
        while total < size:
            line = f'{{"step": {step}, "loss": {1.0 / (step + 1):.6f}, "lr": 0.0003}}\n'.encode()
            lines.append(line)
            total += len(line)
            step += 1
        return b"".join(lines)[:size]
    if pattern == "weights":  # what torch.save writes for a small object: mostly structure
        return (b"PK\x03\x04" + rng.integers(0, 16, size, dtype=np.uint8).tobytes())[:size]
    raise ValueError(f"unknown pattern {pattern!r}")


def item_for(kind: str, chunk_size: int, middle: bool, fqn: str = FQN) -> ItemInfo:
    """The item a chunk of ``chunk_size`` bytes belongs to (three chunks if ``middle``)."""
    dtype = KINDS[kind]
    nbytes = chunk_size * (3 if middle else 1)
    if dtype is None:
        return ItemInfo(fqn, nbytes, None, None, None, CHECKPOINT_ID)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return ItemInfo(fqn, nbytes, dtype, (max(1, nbytes // itemsize),), (0,), CHECKPOINT_ID)


def chunk_for(case: Case, inner: tuple[str, ...] = ()) -> ChunkInfo:
    """The ``ChunkInfo`` the pipeline would hand a transform for ``case``."""
    item = item_for(case.kind, case.size, case.middle)
    if case.middle:
        return ChunkInfo(item, 1, 3, case.size, case.size, inner)
    return ChunkInfo(item, 0, 1, 0, case.size, inner)


def small_cases() -> list[Case]:
    return [
        Case(kind, pattern, size, middle=(i % 2 == 1))
        for kind in KINDS
        for pattern in patterns_for(kind)
        for i, size in enumerate(SMALL_SIZES)
    ]


def large_cases(kind: str) -> list[Case]:
    return [Case(kind, p, s, middle=(i % 2 == 0)) for p in LARGE_PATTERNS for i, s in enumerate(LARGE_SIZES)]
