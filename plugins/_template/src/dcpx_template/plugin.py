"""The plugin module named by the entry point.  Replace the transform with your own."""

from __future__ import annotations

from typing import Callable, Mapping

import dcpx
from dcpx import ChunkInfo


class TemplateTransform(dcpx.Transform):
    """Inverts every byte: trivially reversible, so the skeleton round-trips real data.

    A real plugin does compression, encryption or hashing here.  ``params`` holds what a
    reader needs to decode (recorded in the descriptor); never put secrets there.
    """

    name = "stream.template@example"
    version = 1

    def encode(self, data: memoryview, chunk: ChunkInfo) -> bytes:
        return bytes(data).translate(_INVERT)

    def decode(self, data: memoryview, chunk: ChunkInfo, size: int) -> bytes:
        if len(data) != size:
            raise dcpx.IntegrityError(f"{chunk.item.fqn}: chunk {chunk.index} has {len(data)} bytes, expected {size}")
        return bytes(data).translate(_INVERT)

    @classmethod
    def from_params(cls, version: int, params: Mapping[str, str]) -> "TemplateTransform":
        if version != cls.version or params:
            raise dcpx.DescriptorError(f"{cls.name}: cannot read version {version} with parameters {dict(params)}")
        return cls()


_INVERT = bytes(255 - b for b in range(256))


@dcpx.hookimpl
def dcpx_register_transforms(register: Callable[[type], None]) -> None:
    register(TemplateTransform)
