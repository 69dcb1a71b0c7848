"""The transform contract: how a plugin turns one chunk of bytes into another and back.

``Transform`` is a superset of torch's ``StreamTransformExtension``: it keeps torch's stream
methods (so a dcpx transform can be handed to stock torch), and adds what torch lacks:
parameters in the descriptor, per-item specialisation and a chunk-level buffer API that
the dcpx pipeline runs on a thread pool.
"""

from __future__ import annotations

import abc
import io
import struct
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import IO, Any, ClassVar, Iterator, Mapping

import torch
from torch.distributed.checkpoint._extension import StreamTransformExtension

from .descriptor import Descriptor, format_descriptor, parse
from .errors import CheckpointFormatError, DescriptorError, IntegrityError

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class ItemInfo:
    """What a transform may know about the item it is applied to.

    ``shape``/``offsets`` describe the stored chunk of the (possibly sharded) tensor;
    they are ``None`` for non-tensor (bytes) items.  ``checkpoint_id`` is shared by every
    rank of one save, so transforms can bind their output to a single checkpoint.
    """

    fqn: str
    nbytes: int
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] | None = None
    offsets: tuple[int, ...] | None = None
    checkpoint_id: str = ""

    @property
    def is_tensor(self) -> bool:
        return self.dtype is not None


@dataclass(frozen=True)
class ChunkInfo:
    """One independently decodable chunk of an item, as seen by one transform of the chain.

    ``offset``/``size`` locate the chunk's raw bytes inside the item; ``inner`` lists the
    descriptors of the transforms applied *before* this one (innermost first), so a
    transform can authenticate the layers it wraps.
    """

    item: ItemInfo
    index: int
    count: int
    offset: int
    size: int
    inner: tuple[str, ...] = field(default=())


class Transform(StreamTransformExtension):
    """Base class of dcpx transforms.

    Subclasses set ``name`` (``stream.<thing>@<domain>``) and ``version`` and implement
    ``encode`` and ``decode``.  Those with parameters override ``params`` and
    ``from_params``.  Each instance must be safe to call from several threads at once.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    #: True for transforms whose decode proves the bytes are intact (checksums, AEAD);
    #: ``dcpx verify`` decodes down to the outermost such layer.
    verifies_integrity: ClassVar[bool] = False

    # -- configuration ------------------------------------------------------------------
    def params(self) -> dict[str, str]:
        """Parameters a reader needs to decode; recorded in the descriptor.  Never secrets."""
        return {}

    @classmethod
    def from_params(cls, version: int, params: Mapping[str, str]) -> "Transform":
        """Rebuild a transform from a parsed descriptor.  Strict: unknown input is an error."""
        if version != cls.version:
            raise DescriptorError(f"{cls.name}: unsupported version {version} (this plugin reads {cls.version})")
        if params:
            raise DescriptorError(f"{cls.name}: unknown parameters {sorted(params)}")
        return cls()

    def for_item(self, item: ItemInfo) -> "Transform":
        """Return the transform to use for ``item`` (e.g. a float-aware variant).  Default: self."""
        return self

    def descriptor(self) -> Descriptor:
        return Descriptor(self.name, self.version, self.params())

    def with_descriptor(self, desc: Descriptor) -> "Transform":
        """Rebuild the transform for ``desc`` on the read side, keeping this instance's
        reader-side configuration (e.g. the keyring a user handed to the reader).
        Default: ``type(self).from_params``; transforms with secrets override it."""
        return type(self).from_params(desc.version, desc.params)

    def torch_compatible(self) -> StreamTransformExtension | None:
        """A transform stock torch can read, for the writer's ``compat=True`` mode, or None."""
        return None

    # -- optional per-item results, recorded in the checkpoint manifest ------------------
    def chunk_record(self, encoded: memoryview, chunk: ChunkInfo) -> str | None:
        """Called on this transform's own output for each chunk; e.g. a checksum's digest."""
        return None

    def item_record(self, item: ItemInfo, chunk_records: list[str | None]) -> str | None:
        """Combine the chunk records of one item into the item's manifest entry."""
        return None

    # -- the chunk API the pipeline calls ---------------------------------------------
    @abc.abstractmethod
    def encode(self, data: memoryview, chunk: ChunkInfo) -> Buffer:
        """Transform one chunk.  ``data`` is read-only and valid only during the call."""

    @abc.abstractmethod
    def decode(self, data: memoryview, chunk: ChunkInfo, size: int) -> Buffer:
        """Undo ``encode``.  ``size`` is the exact length the result must have, as recorded
        at save time; produce no more than that and raise a ``dcpx.IntegrityError`` or
        ``dcpx.CheckpointFormatError`` on any mismatch."""

    def decode_into(self, data: memoryview, chunk: ChunkInfo, out: memoryview) -> None:
        """``decode`` straight into ``out`` (writable, exactly the expected size).

        The pipeline calls this for the innermost layer of a chunk that lands whole in the
        destination tensor, so a transform that can write its result in place saves a
        copy of every byte it decodes.  Overrides must check everything ``decode`` checks
        before the first write into ``out``.  Default: ``decode``, then one copy."""
        result = memoryview(self.decode(data, chunk, out.nbytes)).cast("B")
        if result.nbytes != out.nbytes:
            raise IntegrityError(
                f"{chunk.item.fqn}: {self.get_descriptor()} decoded chunk {chunk.index} to {result.nbytes} bytes, "
                f"expected {out.nbytes}"
            )
        out[:] = result

    # -- torch's StreamTransformExtension API -------------------------------------------
    @classmethod
    def registry_name(cls) -> str:  # type: ignore[override]
        return cls.name

    @classmethod
    def from_descriptor(cls, version: str) -> "Transform":  # type: ignore[override]
        desc = parse(f"{cls.name}/{version}")
        return cls.from_params(desc.version, desc.params)

    def get_descriptor(self) -> str:
        return self.descriptor().format()

    def transform_to(self, output: IO[bytes]) -> IO[bytes]:
        return _EncodingWriter(self, output)

    def transform_from(self, input: IO[bytes]) -> IO[bytes]:
        return _decode_stream(self, input)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.get_descriptor()}>"


# A whole stream handed to a dcpx transform through torch's stream API is one chunk,
# prefixed with its raw length so the decoder knows the exact size to expect.  dcpx's reader
# bounds that length by what the item may hold (``stream_limit``); stock torch's reader
# gets STREAM_MAX_BYTES.
_STREAM_HEADER = struct.Struct("<Q")
STREAM_MAX_BYTES = 1 << 34
STREAM_LAYER_SLACK = 1 << 20
_stream_limit: ContextVar[int] = ContextVar("dcpx_stream_limit", default=STREAM_MAX_BYTES)


@contextmanager
def stream_limit(limit: int) -> Iterator[None]:
    """Bound the size each dcpx layer opened with ``transform_from`` in this context may
    claim to ``limit`` plus ``STREAM_LAYER_SLACK`` (an outer layer's output carries the inner
    layers' own headers).  The layer decodes eagerly, so without this eight bytes of header
    could make it allocate gigabytes for an item that holds a few."""
    token = _stream_limit.set(min(limit + STREAM_LAYER_SLACK, STREAM_MAX_BYTES))
    try:
        yield
    finally:
        _stream_limit.reset(token)


def _stream_chunk(size: int) -> ChunkInfo:
    return ChunkInfo(ItemInfo(fqn="<stream>", nbytes=size), 0, 1, 0, size)


class _EncodingWriter(io.RawIOBase):
    def __init__(self, transform: Transform, output: IO[bytes]) -> None:
        self._transform, self._output, self._buffer = transform, output, bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        self._buffer += view
        return len(view)

    def close(self) -> None:
        if not self.closed:
            size = len(self._buffer)
            encoded = self._transform.encode(memoryview(self._buffer), _stream_chunk(size))
            self._output.write(_STREAM_HEADER.pack(size))
            self._output.write(encoded)
            self._output.flush()
            self._output.close()
        super().close()


def _decode_stream(transform: Transform, input: IO[bytes]) -> IO[bytes]:
    header = input.read(_STREAM_HEADER.size)
    if len(header) != _STREAM_HEADER.size:
        raise CheckpointFormatError(f"{transform.name}: stream shorter than its header")
    (size,) = _STREAM_HEADER.unpack(header)
    limit = _stream_limit.get()
    if size > limit:
        raise CheckpointFormatError(f"{transform.name}: stream claims {size} bytes; this item may hold at most {limit}")
    if isinstance(input, io.BytesIO):  # bytes already held (the stored item, an eager layer's output)
        data = input.read()
    else:  # a lazy decoder outside (torch's zstd): read only what this item may hold
        data = read_bounded(input, limit + 1)
        if len(data) > limit:
            raise CheckpointFormatError(f"{transform.name}: stream holds more than the {limit} bytes this item may hold")
    decoded = transform.decode(memoryview(data), _stream_chunk(size), size)
    if len(decoded) != size:
        raise IntegrityError(f"{transform.name}: decoded {len(decoded)} bytes, expected {size}")
    return io.BytesIO(decoded)


class TorchStreamTransform(Transform):
    """Runs a torch ``StreamTransformExtension`` (torch's ``ZStandard``, a user's) per chunk."""

    name = "<torch-stream>"

    def __init__(self, extension: StreamTransformExtension) -> None:
        self.extension = extension

    def descriptor(self) -> Descriptor:
        return parse(self.get_descriptor())

    def get_descriptor(self) -> str:
        return self.extension.get_descriptor()

    def transform_to(self, output: IO[bytes]) -> IO[bytes]:
        return self.extension.transform_to(output)

    def transform_from(self, input: IO[bytes]) -> IO[bytes]:
        return self.extension.transform_from(input)

    def with_descriptor(self, desc: Descriptor) -> "Transform":
        version = desc.format().partition("/")[2]
        return TorchStreamTransform(type(self.extension).from_descriptor(version))

    def torch_compatible(self) -> StreamTransformExtension | None:
        """The extension itself: compat mode writes it exactly as stock torch would, and a
        stock reader loads it given the same ``_extension_registry`` stock torch needs."""
        return self.extension

    def encode(self, data: memoryview, chunk: ChunkInfo) -> Buffer:
        sink = _Sink()
        stream = self.extension.transform_to(sink)
        stream.write(data)
        stream.close()
        return sink.getvalue()

    def decode(self, data: memoryview, chunk: ChunkInfo, size: int) -> Buffer:
        stream = self.extension.transform_from(io.BytesIO(data))
        out = read_bounded(stream, size + 1)
        if len(out) != size:
            raise IntegrityError(
                f"{self.get_descriptor()}: decoded {'more than ' if len(out) > size else ''}"
                f"{min(len(out), size)} bytes, expected {size}"
            )
        return out

    def __repr__(self) -> str:
        return f"<TorchStreamTransform {self.get_descriptor()}>"


class _Sink(io.BytesIO):
    """A BytesIO whose close() keeps the value (torch's writers close the wrapped stream)."""

    def close(self) -> None:
        pass


def read_bounded(stream: IO[bytes], limit: int) -> bytes:
    """Read at most ``limit`` bytes from ``stream`` in bounded steps (never ``read(-1)``)."""
    parts: list[bytes] = []
    total = 0
    while total < limit:
        piece = stream.read(min(limit - total, 1 << 22))
        if not piece:
            break
        parts.append(piece)
        total += len(piece)
    return b"".join(parts)


def holds_keys(transform: Transform) -> bool | None:
    """Whether a keyed transform has any key, asked through its optional ``has_keys()``;
    None for a transform without that method (it cannot say)."""
    probe = getattr(transform, "has_keys", None)
    return bool(probe()) if callable(probe) else None


def transform_name(transform: Transform) -> str:
    """The registry name of a transform instance, without evaluating its parameters."""
    if isinstance(transform, TorchStreamTransform):
        return transform.extension.registry_name()
    return type(transform).name


def descriptor_name(text: str) -> str:
    """The ``name[@domain]`` part of a descriptor string, without validating the rest."""
    return text.partition("/")[0]


__all__ = [
    "Transform",
    "TorchStreamTransform",
    "ItemInfo",
    "ChunkInfo",
    "Buffer",
    "format_descriptor",
    "read_bounded",
]
