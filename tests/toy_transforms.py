"""Toy transforms used only by the core's tests.

They are deliberately cheap, non-commuting and observable: ``xor`` mixes in a keystream
derived from the chunk's offset (so a reader that passes the wrong chunk context decodes
garbage), ``rev`` reverses a chunk and adds one to every byte, ``trailer`` appends a
byte-count trailer (so layer sizes differ), and ``probe`` is an identity transform that
records every call and specialises itself per item.  ``BitFlip`` is a user's torch
``StreamTransformExtension`` written against torch's API only.
"""

from __future__ import annotations

import io
import struct
import threading
from dataclasses import dataclass
from typing import IO, Any, Mapping

import numpy as np
from torch.distributed.checkpoint._extension import StreamTransformExtension

import dcpx
from dcpx.transform import ChunkInfo, ItemInfo


@dataclass(frozen=True)
class Call:
    """One encode/decode call as a transform saw it."""

    transform: str
    op: str
    fqn: str
    nbytes: int
    dtype: Any
    shape: tuple[int, ...] | None
    offsets: tuple[int, ...] | None
    checkpoint_id: str
    index: int
    count: int
    offset: int
    size: int
    inner: tuple[str, ...]
    descriptor: str


class Recorder:
    """Thread-safe log of calls (transforms run on a pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[Call] = []
        self.items: list[ItemInfo] = []

    def clear(self) -> None:
        with self._lock:
            self.calls.clear()
            self.items.clear()

    def add(self, transform: dcpx.Transform, op: str, chunk: ChunkInfo) -> None:
        item = chunk.item
        call = Call(
            transform.name, op, item.fqn, item.nbytes, item.dtype, item.shape, item.offsets,
            item.checkpoint_id, chunk.index, chunk.count, chunk.offset, chunk.size, tuple(chunk.inner),
            transform.get_descriptor(),
        )
        with self._lock:
            self.calls.append(call)

    def add_item(self, item: ItemInfo) -> None:
        with self._lock:
            self.items.append(item)

    def of(self, transform: str | None = None, op: str | None = None, fqn: str | None = None) -> list[Call]:
        with self._lock:
            return [
                c for c in self.calls
                if (transform is None or c.transform == transform)
                and (op is None or c.op == op)
                and (fqn is None or c.fqn == fqn)
            ]


RECORD = Recorder()


def _u8(data: memoryview) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def _check_size(transform: dcpx.Transform, data: memoryview, chunk: ChunkInfo, size: int, extra: int = 0) -> None:
    if data.nbytes != size + extra:
        raise dcpx.IntegrityError(
            f"{chunk.item.fqn}: {transform.name} got {data.nbytes} bytes for chunk {chunk.index}, "
            f"expected {size + extra}"
        )


class _Strict(dcpx.Transform):
    """Shared strict ``from_params`` for parameterless toys."""

    @classmethod
    def from_params(cls, version: int, params: Mapping[str, str]) -> dcpx.Transform:
        if version != cls.version:
            raise dcpx.DescriptorError(f"{cls.name}: unsupported version {version}")
        if params:
            raise dcpx.DescriptorError(f"{cls.name}: unknown parameters {sorted(params)}")
        return cls()


def keystream(n: int, offset: int, seed: int) -> np.ndarray:
    """Bytes ``offset .. offset+n`` of a position-dependent keystream."""
    pos = np.arange(offset, offset + n, dtype=np.uint64)
    return (((pos * np.uint64(2654435761)) >> np.uint64(7)) + np.uint64(seed)).astype(np.uint8)


class XorTransform(dcpx.Transform):
    """XOR with a keystream that depends on the chunk's position in the item."""

    name = "stream.xor@test"
    version = 1

    def __init__(self, seed: int = 90) -> None:
        if not 0 <= int(seed) < 256:
            raise dcpx.ConfigError("seed must be a byte")
        self.seed = int(seed)

    def params(self) -> dict[str, str]:
        return {"seed": str(self.seed)}

    @classmethod
    def from_params(cls, version: int, params: Mapping[str, str]) -> dcpx.Transform:
        if version != cls.version:
            raise dcpx.DescriptorError(f"{cls.name}: unsupported version {version}")
        if set(params) != {"seed"} or not params["seed"].isdigit():
            raise dcpx.DescriptorError(f"{cls.name}: bad parameters {dict(params)}")
        return cls(int(params["seed"]))

    def _apply(self, data: memoryview, chunk: ChunkInfo) -> bytes:
        return (_u8(data) ^ keystream(data.nbytes, chunk.offset, self.seed)).tobytes()

    def encode(self, data: memoryview, chunk: ChunkInfo) -> bytes:
        RECORD.add(self, "encode", chunk)
        return self._apply(data, chunk)

    def decode(self, data: memoryview, chunk: ChunkInfo, size: int) -> bytes:
        RECORD.add(self, "decode", chunk)
        _check_size(self, data, chunk, size)
        return self._apply(data, chunk)

    def decode_into(self, data: memoryview, chunk: ChunkInfo, out: memoryview) -> None:
        """In place, recorded apart from ``decode``: tests see which path the pipeline took."""
        RECORD.add(self, "decode_into", chunk)
        _check_size(self, data, chunk, out.nbytes)
        np.bitwise_xor(_u8(data), keystream(data.nbytes, chunk.offset, self.seed), out=np.frombuffer(out, np.uint8))


class RevTransform(_Strict):
    """Reverse the chunk, then add one to every byte (mod 256)."""

    name = "stream.rev@test"
    version = 1

    def encode(self, data: memoryview, chunk: ChunkInfo) -> bytes:
        RECORD.add(self, "encode", chunk)
        return (_u8(data)[::-1] + np.uint8(1)).tobytes()

    def decode(self, data: memoryview, chunk: ChunkInfo, size: int) -> bytes:
        RECORD.add(self, "decode", chunk)
        _check_size(self, data, chunk, size)
        return (_u8(data) - np.uint8(1))[::-1].tobytes()


TRAILER = struct.Struct("<4sQ")


class TrailerTransform(_Strict):
    """Append a trailer holding a magic and the chunk's byte count (grows every chunk)."""

    name = "stream.trailer@test"
    version = 1

    def encode(self, data: memoryview, chunk: ChunkInfo) -> bytes:
        RECORD.add(self, "encode", chunk)
        return bytes(data) + TRAILER.pack(b"TRLR", data.nbytes)

    def decode(self, data: memoryview, chunk: ChunkInfo, size: int) -> bytes:
        RECORD.add(self, "decode", chunk)
        _check_size(self, data, chunk, size, TRAILER.size)
        magic, count = TRAILER.unpack(data[size:])
        if magic != b"TRLR" or count != size:
            raise dcpx.IntegrityError(f"{chunk.item.fqn}: bad trailer on chunk {chunk.index}")
        return bytes(data[:size])


class ProbeTransform(dcpx.Transform):
    """Identity transform that records what it sees and picks a per-item ``kind``."""

    name = "stream.probe@test"
    version = 1

    def __init__(self, kind: str = "any") -> None:
        self.kind = kind

    def params(self) -> dict[str, str]:
        return {"kind": self.kind}

    @classmethod
    def from_params(cls, version: int, params: Mapping[str, str]) -> dcpx.Transform:
        if version != cls.version or set(params) != {"kind"}:
            raise dcpx.DescriptorError(f"{cls.name}: bad descriptor {version} {dict(params)}")
        return cls(params["kind"])

    def for_item(self, item: ItemInfo) -> dcpx.Transform:
        RECORD.add_item(item)
        if item.dtype is None:
            return ProbeTransform("bytes")
        return ProbeTransform("float" if item.dtype.is_floating_point else "other")

    def encode(self, data: memoryview, chunk: ChunkInfo) -> bytes:
        RECORD.add(self, "encode", chunk)
        return bytes(data)

    def decode(self, data: memoryview, chunk: ChunkInfo, size: int) -> bytes:
        RECORD.add(self, "decode", chunk)
        _check_size(self, data, chunk, size)
        return bytes(data)


ALL = (XorTransform, RevTransform, TrailerTransform, ProbeTransform)


class _FlipWriter(io.RawIOBase):
    def __init__(self, output: IO[bytes]) -> None:
        self._output = output

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        self._output.write((np.frombuffer(view, np.uint8) ^ np.uint8(0xFF)).tobytes())
        return view.nbytes

    def close(self) -> None:
        if not self.closed:
            self._output.close()
        super().close()


class BitFlip(StreamTransformExtension):
    """A user's torch stream extension, written against torch's API only."""

    @staticmethod
    def registry_name() -> str:
        return "stream.bitflip@user"

    @staticmethod
    def from_descriptor(version: str) -> "BitFlip":
        if version != "1":
            raise ValueError(f"unknown version {version}")
        return BitFlip()

    def get_descriptor(self) -> str:
        return "stream.bitflip@user/1"

    def transform_to(self, output: IO[bytes]) -> IO[bytes]:
        return _FlipWriter(output)  # type: ignore[return-value]

    def transform_from(self, input: IO[bytes]) -> IO[bytes]:
        return io.BytesIO((np.frombuffer(input.read(), np.uint8) ^ np.uint8(0xFF)).tobytes())


class ToyPlugin:
    """An in-process plugin object registering the toys."""

    @dcpx.hookimpl
    def dcpx_register_transforms(self, register: Any) -> None:
        for cls in ALL:
            register(cls)
