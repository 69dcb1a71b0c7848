"""A small reversible transform the conformance kit chains with the transform under test.

``stream.xor@dcpx-testing`` XORs every byte with a keystream computed from the byte's
position in the item (``chunk.offset`` + index in the chunk) and a seed.  It is cheap,
keeps sizes unchanged, does not commute with compression or encryption, and decodes to
garbage if a pipeline hands it the wrong chunk context - which is what makes it a useful
neighbour in a chain.  It is a test fixture, not a security measure.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from ..errors import ConfigError, DescriptorError, IntegrityError
from ..hookspecs import hookimpl
from ..transform import ChunkInfo, Transform

_MULTIPLIER = np.uint64(0x9E3779B1)


def keystream(n: int, offset: int, seed: int) -> np.ndarray:
    """Bytes ``offset .. offset + n`` of the position-dependent keystream for ``seed``."""
    pos = np.arange(offset, offset + n, dtype=np.uint64)
    return (((pos * _MULTIPLIER) >> np.uint64(11)) ^ np.uint64(seed)).astype(np.uint8)


class XorReference(Transform):
    """XOR with an offset-derived keystream; strict about sizes and descriptors."""

    name = "stream.xor@dcpx-testing"
    version = 1

    def __init__(self, seed: int = 0xA5) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 256:
            raise ConfigError(f"{self.name}: seed must be an integer in [0, 255], got {seed!r}")
        self.seed = seed

    def params(self) -> dict[str, str]:
        return {"seed": str(self.seed)}

    @classmethod
    def from_params(cls, version: int, params: Mapping[str, str]) -> "XorReference":
        if version != cls.version:
            raise DescriptorError(f"{cls.name}: unsupported version {version} (this reads {cls.version})")
        unknown = sorted(set(params) - {"seed"})
        if unknown:
            raise DescriptorError(f"{cls.name}: unknown parameters {unknown}")
        seed = params.get("seed", "")
        if not seed.isdigit() or str(int(seed)) != seed or int(seed) > 255:
            raise DescriptorError(f"{cls.name}: invalid seed {seed!r}")
        return cls(int(seed))

    def _apply(self, data: memoryview, chunk: ChunkInfo) -> bytes:
        raw = np.frombuffer(data, dtype=np.uint8)
        return (raw ^ keystream(raw.size, chunk.offset, self.seed)).tobytes()

    def encode(self, data: memoryview, chunk: ChunkInfo) -> bytes:
        return self._apply(memoryview(data).cast("B"), chunk)

    def decode(self, data: memoryview, chunk: ChunkInfo, size: int) -> bytes:
        view = memoryview(data).cast("B")
        if view.nbytes != size:
            raise IntegrityError(
                f"{self.name}: item {chunk.item.fqn!r} chunk {chunk.index}: "
                f"{view.nbytes} bytes stored, expected {size}"
            )
        return self._apply(view, chunk)


class ReferencePlugin:
    """A plugin object registering ``XorReference``:
    ``dcpx.register_plugin(ReferencePlugin(), name="dcpx-testing")``."""

    @hookimpl
    def dcpx_register_transforms(self, register: Callable[[type], None]) -> None:
        register(XorReference)


def plugin_for(cls: type) -> Any:
    """An in-process plugin object that registers ``cls`` (for transforms not installed
    through an entry point, e.g. one defined in a test module)."""

    class _Single:
        @hookimpl
        def dcpx_register_transforms(self, register: Callable[[type], None]) -> None:
            register(cls)

    return _Single()
