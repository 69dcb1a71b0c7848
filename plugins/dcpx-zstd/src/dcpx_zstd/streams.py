"""torch's stream API for the plain ``stream.zstd/1`` format.

Stock torch writes each item as one zstd stream (``zstandard``'s stream writer, so the
frame states no content size) and reads it back through a stream reader.  dcpx reads a
stock checkpoint through ``transform_from`` of whatever class is registered for
``stream.zstd``, so this reader must accept exactly that, decode lazily (memory bounded by
what the caller asks for, whatever the frame claims) and, unlike torch's, notice a stream
that stops inside a frame.
"""

from __future__ import annotations

import io
from typing import IO, Any

import zstandard

import dcpx

from .codec import new_compressor, new_decompressor
from .frames import FrameWalker

READ_SIZE = 1 << 20


def open_writer(output: IO[bytes], level: int) -> IO[bytes]:
    """A writable stream that zstd-compresses into ``output`` (closing it closes ``output``),
    readable by stock torch's ``ZStandard``.  A fresh context: the stream outlives the call."""
    return new_compressor(level).stream_writer(output)


class _Tap:
    """A read-only source that shows every byte it hands out to a ``FrameWalker``."""

    def __init__(self, source: IO[bytes], walker: FrameWalker) -> None:
        self._source, self._walker = source, walker

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size if size is not None and size >= 0 else READ_SIZE)
        if data:
            self._walker.feed(memoryview(data))
        return data


class StreamReader(io.RawIOBase):
    """Lazily decodes a stream of zstd frames; every zstd failure is a dcpx error."""

    def __init__(self, source: IO[bytes], where: str = "stream.zstd") -> None:
        super().__init__()
        self._where = where
        self._walker = FrameWalker()
        self._reader = new_decompressor().stream_reader(
            _Tap(source, self._walker), read_size=READ_SIZE, read_across_frames=True
        )
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._done:
            return 0
        try:
            count = self._reader.readinto(buffer)
        except zstandard.ZstdError as exc:
            raise dcpx.CheckpointFormatError(f"{self._where}: corrupt zstd stream: {exc}") from exc
        except dcpx.CheckpointFormatError as exc:
            raise dcpx.CheckpointFormatError(f"{self._where}: {exc}") from exc
        if not count and memoryview(buffer).nbytes:
            self._done = True
            if not self._walker.complete():
                what = "is empty" if self._walker.empty() else "ends inside a frame (truncated)"
                raise dcpx.CheckpointFormatError(f"{self._where}: zstd stream {what}")
        return count

    def readall(self) -> bytes:
        parts = []
        while True:
            piece = self.read(READ_SIZE)
            if not piece:
                return b"".join(parts)
            parts.append(piece)

    def close(self) -> None:
        if not self.closed:
            self._reader.close()
        super().close()
